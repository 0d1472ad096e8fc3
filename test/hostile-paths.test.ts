/**
 * Hostile images that reach past the image's own rights through what the
 * restore does on their behalf (r344's findings 3-6, 8, 9): names resolved
 * as the engine's own process, a cgroup joined with the restorer's rights,
 * REDIR PATH directories made as root, a chain of parents that never
 * ends, pseudoterminals no one holds, key files another user owns. Each is
 * refused in one line, with nothing left: no process, no registration, no
 * table, no directory made. The honest counterparts still restore.
 *
 * Crafted as hostile.test.ts crafts them: a real image decoded, changed,
 * encoded and signed again with the sandbox's own key. An image that does
 * not say it is this node's snapshot (fromSnapshot cleared) stands for one
 * signed by another trusted key: its word is a claim.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { FdKind, type Image } from '../src/image/types.js';
import { writeSignedImage } from './crafted.js';
import { cgroupRoot, cli, Sandbox, waitFor } from './helpers.js';

const NOBODY = 65534;
const isRoot = process.geteuid?.() === 0;
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-hostile-paths-'));
chmodSync(out, 0o755);
process.env.APPSHOT_HOME = sb.home;

/** Images as snapshotted: of a root process, and of a uid-65534 one. */
const base: Record<'root' | 'nobody', { dir: string; image: Image }> = {} as never;

type Shown = { init: boolean; argv?: string[] };

/** `processes`: how many `appshot ps` shows (init among them) once it
 * has started; `ready`: what else they must show first. */
async function snapshotOf(aid: string, argv: string[], processes = 2, ready: (ps: Shown[]) => boolean = () => true): Promise<{ dir: string; image: Image }> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...argv]);
  if (r.code !== 0) throw new Error(r.stderr);
  const dir = join(out, `base-${aid}`);
  await waitFor(
    () => {
      const ps = sb.json<{ processes: Shown[] }[]>(['ps', aid])[0].processes;
      return ps.length >= processes && ready(ps);
    },
    10_000,
    `${aid} to start`,
  );
  const s = sb.run(['snapshot', aid, '-o', dir]);
  if (s.code !== 0) throw new Error(s.stderr);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  const loaded = await loadImage(dir, { trust: 'report' });
  const image = loaded.image;
  loaded.dispose();
  return { dir, image };
}

beforeAll(async () => {
  base.root = await snapshotOf('rootapp', ['sleep', '1000']);
  // chroot --userspec: plain setresuid (as creds.test.ts).
  if (isRoot) base.nobody = await snapshotOf('nobapp', ['chroot', `--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'sleep', '1000']);
});

afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** `from`'s image changed by `change`, under `name`, signed by the
 * sandbox's key as image `id`; `own`: still says it is this node's
 * snapshot. */
function crafted(name: string, from: keyof typeof base, change: (i: Image) => void, opts: { id?: string; own?: boolean } = {}): string {
  const image = structuredClone(base[from].image);
  if (!opts.own) image.fromSnapshot = false;
  change(image);
  return writeSignedImage(join(out, name), image, base[from].dir, { id: opts.id });
}

/** Processes whose command line names the sandbox (init, seeds, the
 * application under it). */
const sandboxProcesses = () => spawnSync('pgrep', ['-f', sb.home], { encoding: 'utf8' }).stdout.trim();

/** `appshot restore dir` refused: one line matching `line`, a non-zero
 * exit, and nothing left (`paths`: that must not exist after). Returns
 * the exit code. */
function refused(dir: string, line: RegExp, paths: string[] = []): number | null {
  const shm = sb.shmFiles();
  const r = sb.run(['restore', dir]);
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^appshot: /);
  expect(lines[0]).not.toMatch(/internal error/);
  expect(lines[0]).toMatch(line);
  expect(r.code, r.stderr).not.toBe(0);
  expect(sb.aids()).toEqual([]);
  expect(sb.shmFiles()).toEqual(shm);
  const tmp = join(sb.home, 'tmp');
  expect(existsSync(tmp) ? readdirSync(tmp) : []).toEqual([]);
  for (const p of paths) expect(existsSync(p), `${p} was made`).toBe(false);
  return r.code;
}

/** A restore that succeeds; its application removed after `check`. */
function restores(dir: string, aid: string, check: (pid: number) => void = () => {}): void {
  const r = sb.run(['restore', dir, '--aid', aid]);
  expect(r.code, r.stderr).toBe(0);
  try {
    check(sb.systemPid(aid));
  } finally {
    sb.run(['kill', aid]);
    sb.run(['rm', aid]);
  }
}

/** A FILE descriptor naming `path` (a copy of the process's first FILE
 * descriptor, at number 40). */
function withFilePath(i: Image, path: string, procVpid?: number): void {
  const p = i.processes.find((q) => q.fds.some((f) => f.kind === FdKind.FILE))!;
  const fd = structuredClone(p.fds.find((f) => f.kind === FdKind.FILE)!);
  // A file of its own, as a snapshot records one.
  const file = { ...structuredClone(i.files[fd.file]), path };
  // An open description of its own, too (one shared is made once).
  const n = p.fds.filter((f) => f.fd >= 40 && f.fd < 50).length;
  Object.assign(fd, { fd: 40 + n, path, pos: 0n, procVpid, file: i.files.push(file) - 1, description: 4000 + n, flags: 0 });
  p.fds.push(fd);
}

describe("names resolved as the engine's own process (r344 #5)", () => {
  const engineOwn: [string, (i: Image) => void, RegExp][] = [
    ['/proc/self/mem', (i) => withFilePath(i, '/proc/self/mem'), /fd 40 names "\/proc\/self\/mem", which would be resolved as the restoring engine's own/],
    ['/proc/thread-self/environ', (i) => withFilePath(i, '/proc/thread-self/environ'), /thread-self.*engine's own/],
    ['//proc//self/maps', (i) => withFilePath(i, '//proc//self/maps'), /engine's own/],
    ['/dev/fd/3', (i) => withFilePath(i, '/dev/fd/3'), /"\/dev\/fd\/3", which would be resolved as the restoring engine's own/],
    ['/dev/stdin', (i) => withFilePath(i, '/dev/stdin'), /"\/dev\/stdin".*engine's own/],
    ['/proc/1/mem (a process outside the application)', (i) => withFilePath(i, '/proc/1/mem'), /fd 40 names "\/proc\/1\/mem", \/proc of process 1, which is not one of the application's/],
    ['/proc/N/mem said to be of a process the image does not have', (i) => withFilePath(i, '/proc/77/mem', 77), /\/proc of process 77, which the image does not have/],
    ['a working directory /proc/self/cwd', (i) => void (i.processes[0].cwd = '/proc/self/cwd'), /working directory names "\/proc\/self\/cwd"/],
    ['a mapping of /proc/self/mem', (i) => void (i.processes[0].vmas.find((v) => v.path.startsWith('/'))!.path = '/proc/self/mem'), /mapping at 0x[0-9a-f]+ names "\/proc\/self\/mem"/],
    ['an executable /proc/self/exe', (i) => void (i.processes[0].exe = '/proc/self/exe'), /executable names "\/proc\/self\/exe"/],
  ];
  for (const [what, change, line] of engineOwn)
    it(`refuses ${what} before anything is made`, () => {
      refused(crafted(`own-${what.replace(/\W+/g, '_')}`, 'root', change), line);
      expect(sandboxProcesses()).toBe('');
    });

  it("refuses a name that leads through a symlink to the engine's own /proc/self/mem", () => {
    const link = join(out, 'to-self-mem');
    rmSync(link, { force: true });
    symlinkSync('/proc/self/mem', link);
    refused(crafted('own-through-link', 'root', (i) => withFilePath(i, link)), new RegExp(`fd 40: ${link} leads to the /proc file /proc/\\d+/mem, which is not the application's own`));
    expect(sandboxProcesses()).toBe('');
  });

  /** `appshot restore dir` run in a CLI process of its own (no engine)
   * whose standard input is a pipe, or the file `stdin`: what it said and
   * how it ended. An application a wrong restore made is removed. */
  const restoreHere = (dir: string, stdin?: string) => {
    const script = stdin === undefined ? ': | exec "$0" "$@"' : 'exec "$0" "$@" < "$RESTORER_STDIN"';
    const r = spawnSync('sh', ['-c', script, process.execPath, cli, 'restore', dir, '--aid', 'here'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', RESTORER_STDIN: stdin ?? '' }, encoding: 'utf8', timeout: 50_000 });
    if (r.status === 0) {
      sb.run(['kill', 'here']);
      sb.run(['rm', 'here']);
    }
    return { code: r.status, signal: r.signal, lines: r.stderr.split('\n').filter(Boolean), stderr: r.stderr };
  };

  describe.runIf(isRoot)('through a second procfs mount (r353 #5)', () => {
    const p2 = join(out, 'p2');
    beforeAll(() => {
      mkdirSync(p2, { recursive: true });
      const m = spawnSync('mount', ['-t', 'proc', 'proc', p2], { encoding: 'utf8' });
      if (m.status !== 0) throw new Error(m.stderr);
    });
    afterAll(() => {
      // Lazily: a descriptor a wrong restore handed out may hold it.
      spawnSync('umount', ['-l', p2]);
    });
    // Its own superblock (Linux 5.8), so neither /proc's device nor a
    // /proc/ prefix: the restorer's own memory, and init's status.
    for (const [name, shown] of [
      ['self/mem', '\\d+/mem'],
      ['1/status', '1/status'],
    ])
      it(`refuses a descriptor named ${name} there, and leaves nothing`, () => {
        const path = join(p2, name);
        refused(crafted(`p2-${name.replace(/\W+/g, '_')}`, 'root', (i) => withFilePath(i, path)), new RegExp(`fd 40: ${path} leads to the /proc file ${p2}/${shown}, which is not the application's own`));
        expect(sandboxProcesses()).toBe('');
      });
  });

  it("refuses a named FIFO that leads through /proc/self/fd to the restorer's own pipe", () => {
    // The restorer's standard input is a pipe: a FIFO to fstat.
    const link = join(out, 'fifo-to-self-fd');
    rmSync(link, { force: true });
    symlinkSync('/proc/self/fd/0', link);
    const dir = crafted('fifo-self-fd', 'root', (i) => {
      const p = i.processes[0];
      const fd = structuredClone(p.fds.find((f) => f.kind === FdKind.FIFO || f.kind === FdKind.FILE)!);
      const pipe = i.pipes.push({ ino: 4242n, data: Buffer.alloc(0), capacity: 65536, fifoPath: link }) - 1;
      Object.assign(fd, { fd: 45, kind: FdKind.FIFO, path: link, pipe, pos: 0n, flags: 2, description: 0 });
      p.fds.push(fd);
    });
    const r = restoreHere(dir);
    expect(r.lines, r.stderr).toHaveLength(1);
    // Refused at the walk now, before the check after the open (which
    // refused it as the pipe it led to): /proc/self/fd/0 is a magic link.
    expect(r.lines[0]).toMatch(new RegExp(`the named FIFO ${link} leads through a /proc magic link`));
    expect(r.code).not.toBe(0);
    expect(sb.aids()).toEqual([]);
    expect(sandboxProcesses()).toBe('');
  });

  /** `restoreHere(dir, stdin)` refused: one line matching `line`, a
   * non-zero exit, and nothing left (no application, process, table file
   * or temporary file). */
  const refusedHere = (dir: string, line: RegExp, stdin?: string) => {
    const shm = sb.shmFiles();
    const r = restoreHere(dir, stdin);
    expect(r.lines, r.stderr).toHaveLength(1);
    expect(r.lines[0]).toMatch(/^appshot: /);
    expect(r.lines[0]).not.toMatch(/internal error/);
    expect(r.lines[0]).toMatch(line);
    expect(r.code, r.stderr).not.toBe(0);
    expect(sb.aids()).toEqual([]);
    expect(sb.shmFiles()).toEqual(shm);
    const tmp = join(sb.home, 'tmp');
    expect(existsSync(tmp) ? readdirSync(tmp) : []).toEqual([]);
    expect(sandboxProcesses()).toBe('');
  };

  describe("names that lead through a /proc magic link to the restorer's own descriptors (h359)", () => {
    // /proc/self/fd/N, followed by a thread of the restorer, is its own
    // descriptor N whatever identity the thread took (a process always
    // passes the check of its own /proc), and a regular file there is no
    // /proc file to a check after the open: only the walk can refuse it.
    const link = (name: string, to: string) => {
      const at = join(out, name);
      rmSync(at, { force: true });
      symlinkSync(to, at);
      return at;
    };

    it("refuses a descriptor whose name is a symlink to /proc/self/fd/0, a regular file the restorer holds, and leaves nothing", () => {
      // What the resident engine's open files, memfds and tables are to
      // it: here a file the restoring CLI process holds as its input.
      const own = join(out, 'restorers-own-file');
      writeFileSync(own, "the restorer's own\n", { mode: 0o600 });
      const to = link('to-self-fd0', '/proc/self/fd/0');
      refusedHere(crafted('magic-self-fd', 'root', (i) => withFilePath(i, to)), new RegExp(`${to}, which process \\d+ holds open as fd 40, leads through a /proc magic link .*which a restore never follows`), own);
    });

    it("refuses one that passes through /proc/self/root on the way, in the engine", () => {
      const to = link('to-self-root', '/proc/self/root');
      const path = join(to, 'etc', 'passwd');
      refused(crafted('magic-self-root', 'root', (i) => withFilePath(i, path)), new RegExp(`${path}, which process \\d+ holds open as fd 40, leads through a /proc magic link`));
      expect(sandboxProcesses()).toBe('');
    });

    it("refuses a working directory that leads through /proc/self/cwd", () => {
      const to = link('to-self-cwd', '/proc/self/cwd');
      refused(crafted('magic-self-cwd', 'root', (i) => void (i.processes.find((p) => p.fds.some((f) => f.kind === FdKind.FILE))!.cwd = to)), new RegExp(`working directory ${to} leads through a /proc magic link`));
      expect(sandboxProcesses()).toBe('');
    });
  });

  describe("inotify watches and fanotify marks checked after their names are walked (h359)", () => {
    /** An inotify descriptor at fd 911 of the first process with a file
     * descriptor, watching `path`. */
    const inotifyOn = (path: string) => (i: Image) => {
      const p = i.processes.find((q) => q.fds.some((f) => f.kind === FdKind.FILE))!;
      const fd = structuredClone(p.fds.find((f) => f.kind === FdKind.FILE)!);
      Object.assign(fd, { fd: 911, kind: FdKind.INOTIFY, flags: 0o4000, path: 'anon_inode:inotify', file: -1, description: 4911, pos: 0n, inotifyWatches: [{ wd: 1, path, mask: 0x2 }] });
      p.fds.push(fd);
    };
    /** A fanotify group at fd 912, with an inode mark on `path`. */
    const fanotifyOn = (path: string) => (i: Image) => {
      const p = i.processes.find((q) => q.fds.some((f) => f.kind === FdKind.FILE))!;
      const fd = structuredClone(p.fds.find((f) => f.kind === FdKind.FILE)!);
      const g = { flags: 0x3, eventFlags: 0o100000, unprivileged: false, marks: [{ kind: 0, path, flags: 0, mask: 0x2, ignoredMask: 0 }] };
      Object.assign(fd, { fd: 912, kind: FdKind.FANOTIFY, flags: 0o4002, path: 'anon_inode:[fanotify]', file: -1, description: 4912, pos: 0n, fanotify: g });
      p.fds.push(fd);
    };
    const toSelf = () => {
      const at = join(out, 'to-proc-self');
      rmSync(at, { force: true });
      symlinkSync('/proc/self', at);
      return at;
    };

    it("refuses an inotify watch whose name leads through a symlink to the engine's own /proc directory, and leaves nothing", () => {
      const path = join(toSelf(), 'status');
      refused(crafted('inotify-self', 'root', inotifyOn(path)), new RegExp(`fd 911: its inotify watch 1: ${path} leads to the /proc file /proc/\\d+/status, which is not the application's own`));
      expect(sandboxProcesses()).toBe('');
    });

    it('refuses an inotify watch whose name passes through a /proc magic link', () => {
      const to = join(out, 'watch-to-self-root');
      rmSync(to, { force: true });
      symlinkSync('/proc/self/root', to);
      const path = join(to, 'tmp');
      refused(crafted('inotify-magic', 'root', inotifyOn(path)), new RegExp(`fd 911: its inotify watch 1 on ${path} leads through a /proc magic link`));
      expect(sandboxProcesses()).toBe('');
    });

    it.runIf(isRoot)("refuses a fanotify mark whose name leads through a symlink to the engine's own /proc directory, and leaves nothing", () => {
      const path = join(toSelf(), 'status');
      refused(crafted('fanotify-self', 'root', fanotifyOn(path)), new RegExp(`fd 912: its fanotify mark: ${path} leads to the /proc file /proc/\\d+/status, which is not the application's own`));
      expect(sandboxProcesses()).toBe('');
    });

    it('still restores a watch and a mark on a name reached through an honest symlink, on the very file', () => {
      const real = mkdtempSync(join(out, 'watched-'));
      writeFileSync(join(real, 'file'), 'watched\n');
      const to = join(out, 'to-watched');
      rmSync(to, { force: true });
      symlinkSync(real, to);
      const path = join(to, 'file');
      const ino = statSync(join(real, 'file')).ino.toString(16);
      const dir = crafted('watch-honest', 'root', (i) => {
        inotifyOn(path)(i);
        if (isRoot) fanotifyOn(path)(i);
      });
      const vpid = base.root.image.processes.find((q) => q.fds.some((f) => f.kind === FdKind.FILE))!.vpid;
      const r = sb.run(['restore', dir, '--aid', 'watchhonest']);
      expect(r.code, r.stderr).toBe(0);
      try {
        const pid = sb.systemPid('watchhonest', vpid);
        expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${ino} `, 'm'));
        if (isRoot) expect(readFileSync(`/proc/${pid}/fdinfo/912`, 'utf8')).toMatch(new RegExp(`^fanotify ino:${ino} `, 'm'));
      } finally {
        sb.run(['kill', 'watchhonest']);
        sb.run(['rm', 'watchhonest']);
      }
    });
  });

  describe.runIf(isRoot)("a watch a retry identity adds only on what it reaches itself, following no symlink (r375 M1)", () => {
    // A root master and its uid-65534 worker (a PHP-FPM pool's layout).
    // The worker watches a directory as Debian's /var/lib/php/sessions
    // is: 1733, root's, inside a 0711 one. The worker may search and
    // write it, not read it: its own watch is refused (inotify asks read
    // permission), the master's is made as the application's other
    // identity, which a root master could have handed over. The name the
    // worker's watch names, though, leads through `link`, which the
    // worker's user put in its own directory since: the worker's walk to
    // the name (O_PATH: search permission only) follows it, and the
    // master's watch must not be made on what that symlink chose.
    let app: { dir: string; image: Image };
    let worker: number;
    let tree: string;
    beforeAll(async () => {
      const sleeps = (ps: Shown[]) => ps.filter((q) => q.argv?.[0] === 'sleep').length === 2;
      app = await snapshotOf('twoids', ['sh', '-c', `chroot --userspec=${NOBODY}:${NOBODY} --groups= / sleep 1000 & exec sleep 1000`], 3, sleeps);
      worker = app.image.processes.find((q) => q.creds.uid[3] === NOBODY)!.vpid;
      expect(app.image.processes.some((q) => q.creds.uid[3] === 0)).toBe(true);
      tree = mkdtempSync(join(out, 'sessions-'));
      chmodSync(tree, 0o755);
      mkdirSync(join(tree, 'hidden'), { mode: 0o711 });
      chmodSync(join(tree, 'hidden'), 0o711);
      mkdirSync(join(tree, 'hidden', 'secretdir'));
      chmodSync(join(tree, 'hidden', 'secretdir'), 0o1733);
      mkdirSync(join(tree, 'w'));
      chownSync(join(tree, 'w'), NOBODY, NOBODY);
      symlinkSync('../hidden', join(tree, 'w', 'link'));
    });
    /** The worker's image with an inotify instance at fd 911 watching
     * `path` (IN_MODIFY | IN_CREATE). */
    const watching = (name: string, path: string) =>
      writeSignedImage(
        join(out, name),
        (() => {
          const i = structuredClone(app.image);
          i.fromSnapshot = false;
          const like = i.processes.flatMap((q) => q.fds).find((f) => f.kind === FdKind.FILE)!;
          const fd = structuredClone(like);
          Object.assign(fd, { fd: 911, kind: FdKind.INOTIFY, flags: 0o4000, path: 'anon_inode:inotify', file: -1, description: 4911, pos: 0n, inotifyWatches: [{ wd: 1, path, mask: 0x102 }] });
          i.processes.find((q) => q.vpid === worker)!.fds.push(fd);
          return i;
        })(),
        app.dir,
      );

    it("refuses the worker's watch through the symlink its user planted, in one line, and leaves nothing", () => {
      const path = join(tree, 'w', 'link', 'secretdir');
      const code = refused(watching('m1-planted', path), new RegExp(`process ${worker} fd 911: its inotify watch 1 on ${path} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EACCES$`));
      expect(code).toBe(5);
      expect(sandboxProcesses()).toBe('');
    });

    it("still restores the worker's watch on the directory's own name, made as the master", () => {
      const path = join(tree, 'hidden', 'secretdir');
      const ino = statSync(path).ino.toString(16);
      const r = sb.run(['restore', watching('m1-honest', path), '--aid', 'm1honest']);
      expect(r.code, r.stderr).toBe(0);
      try {
        const pid = sb.systemPid('m1honest', worker);
        expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\t${NOBODY}\\t`, 'm'));
        expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${ino} `, 'm'));
      } finally {
        sb.run(['kill', 'm1honest']);
        sb.run(['rm', 'm1honest']);
      }
    });
  });

  it("still restores a descriptor of the application's own /proc and of /proc/meminfo", () => {
    const dir = crafted('proc-honest', 'root', (i) => {
      const p = i.processes[0];
      withFilePath(i, `/proc/${p.vpid}/status`, p.vpid);
      withFilePath(i, '/proc/meminfo');
    });
    restores(dir, 'prochonest', (pid) => {
      expect(readFileSync(`/proc/${pid}/fdinfo/40`, 'utf8')).toMatch(/pos:/);
      expect(spawnSync('readlink', [`/proc/${pid}/fd/40`], { encoding: 'utf8' }).stdout.trim()).toBe(`/proc/${pid}/status`);
      expect(spawnSync('readlink', [`/proc/${pid}/fd/41`], { encoding: 'utf8' }).stdout.trim()).toBe('/proc/meminfo');
    });
  });
});

const cgroups = isRoot ? cgroupRoot() : undefined;

describe.runIf(cgroups !== undefined)("cgroups joined as the image's processes would join them (r344 #3)", () => {
  let group = '';
  let mount = '';
  beforeAll(() => {
    group = mkdtempSync(join(cgroups!, 'appshot-hp-'));
    const line = readFileSync('/proc/self/mountinfo', 'utf8').split('\n').find((l) => l.split(' - ')[1]?.startsWith('cgroup2 '))!;
    mount = line.split(' - ')[0].split(' ')[4];
  });
  afterAll(() => {
    // Anything a wrong restore moved in goes back up before removal.
    for (const pid of readFileSync(join(group, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean)) writeFileSync(join(group, '..', 'cgroup.procs'), pid);
    rmdirSync(group);
  });
  const inGroup = (pid: number) => /^0::(.*)$/m.exec(readFileSync(`/proc/${pid}/cgroup`, 'utf8'))![1];

  it('refuses a uid-65534 image that names a cgroup only root may enter, and leaves nothing', () => {
    const path = group.slice(mount.length) || '/';
    const dir = crafted('cgroup-rootonly', 'nobody', (i) => void i.processes.forEach((p) => (p.cgroup = path)));
    refused(dir, new RegExp(`cannot be put back into its cgroup ${path} as the image's processes \\(uid 65534\\) may not enter it: EACCES`));
    expect(readFileSync(join(group, 'cgroup.procs'), 'utf8')).toBe('');
    expect(sandboxProcesses()).toBe('');
  });

  it('refuses that image before anything is made (r353 #7)', () => {
    // A restore that reaches the point after its checks is killed there:
    // the refusal must come first.
    const path = group.slice(mount.length) || '/';
    const dir = crafted('cgroup-early', 'nobody', (i) => void i.processes.forEach((p) => (p.cgroup = path)));
    const r = spawnSync(process.execPath, [cli, 'restore', dir], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: 'restore: node verified' }, encoding: 'utf8', timeout: 50_000 });
    expect(r.signal, r.stderr).toBeNull();
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`cannot be put back into its cgroup ${path} as the image's processes \\(uid 65534\\) may not enter it: EACCES`));
    expect(r.status).not.toBe(0);
    expect(sb.aids()).toEqual([]);
  });

  it("refuses a process the restore would move into the restorer's own cgroup as the image may not, before anything is made (h359)", async () => {
    // The restorer runs in `engine`, a cgroup only root may enter, beside
    // `g1`, which (with their parent) is delegated to uid 65534. The
    // image's shell goes into g1; its subshell, a fork sharing its memory,
    // is forked from it there (restore/driver.ts forks such a child once
    // its parent's memory, and cgroup, are made), and its cgroup, and its
    // sleep's, is the restorer's: each must be moved back into it, which
    // uid 65534 may not. That was asked only at the move, after the
    // processes were made; the kill point after the checks must not be
    // reached.
    const forking = await snapshotOf('nobfork', ['chroot', `--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'sh', '-c', '(sleep 1000; true) & wait'], 4);
    const child = forking.image.processes.find((c) => c.vmas.some((v) => v.pages?.cowShared?.length));
    expect(child, 'a process sharing memory with its parent').toBeDefined();
    const parent = forking.image.processes.find((q) => q.vpid === child!.vppid)!;
    const top = mkdtempSync(join(cgroups!, 'appshot-hp-seed-'));
    const engine = join(top, 'engine');
    const g1 = join(top, 'g1');
    mkdirSync(engine);
    mkdirSync(g1);
    try {
      // (mkdtemp makes it 0700: searchable by uid 65534 too.)
      chmodSync(top, 0o755);
      chownSync(join(top, 'cgroup.procs'), NOBODY, NOBODY);
      chownSync(join(g1, 'cgroup.procs'), NOBODY, NOBODY);
      const rel = (dir: string) => dir.slice(mount.length) || '/';
      const image = structuredClone(forking.image);
      image.fromSnapshot = false;
      for (const p of image.processes) p.cgroup = p.vpid === parent.vpid ? rel(g1) : rel(engine);
      const dir = writeSignedImage(join(out, 'cgroup-seed'), image, forking.dir);
      const restoreIn = (killAt?: string) =>
        spawnSync('sh', ['-c', 'echo $$ > "$RESTORER_CGROUP/cgroup.procs" && exec "$0" "$@"', process.execPath, cli, 'restore', dir], {
          env: { ...sb.env, APPSHOT_ENGINE: 'off', RESTORER_CGROUP: engine, ...(killAt ? { APPSHOT_TEST_KILL_AT: killAt } : {}) },
          encoding: 'utf8',
          timeout: 50_000,
        });
      const line = new RegExp(`cannot be put back into its cgroup ${rel(engine)} as the image's processes \\(uid 65534\\) may not enter it: EACCES`);
      const early = restoreIn('restore: node verified');
      expect(early.signal, early.stderr).toBeNull();
      expect(early.stderr.trim().split('\n')).toHaveLength(1);
      expect(early.stderr).toMatch(line);
      expect(early.status).not.toBe(0);
      // And refused so, it leaves nothing.
      const shm = sb.shmFiles();
      const r = restoreIn();
      expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(line);
      expect(r.status).not.toBe(0);
      expect(sb.aids()).toEqual([]);
      expect(sb.shmFiles()).toEqual(shm);
      expect(sandboxProcesses()).toBe('');
      expect(readFileSync(join(g1, 'cgroup.procs'), 'utf8')).toBe('');
      expect(readFileSync(join(engine, 'cgroup.procs'), 'utf8')).toBe('');
    } finally {
      for (const g of [engine, g1])
        for (const pid of readFileSync(join(g, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean)) writeFileSync(join(top, '..', 'cgroup.procs'), pid);
      rmdirSync(engine);
      rmdirSync(g1);
      rmdirSync(top);
    }
  });

  it("still puts an image's root process, or a snapshot of this node's uid-65534 one, back in its cgroup", () => {
    const path = group.slice(mount.length) || '/';
    restores(
      crafted('cgroup-root', 'root', (i) => void i.processes.forEach((p) => (p.cgroup = path))),
      'cgroot',
      (pid) => expect(inGroup(pid)).toBe(path),
    );
    restores(
      crafted('cgroup-own', 'nobody', (i) => void i.processes.forEach((p) => (p.cgroup = path)), { own: true }),
      'cgown',
      (pid) => expect(inGroup(pid)).toBe(path),
    );
  });
});

describe.runIf(isRoot)("REDIR PATH directories made as the image's processes (r344 #4)", () => {
  const redir = (to: string) => (i: Image) => void (i.instance = { redirs: [{ kind: 'path', from: '/nonexistent-h347/file', to }], env: [] } as never);

  it('refuses a uid-65534 image whose REDIR PATH target lies where it may not make a directory, and makes none', () => {
    const rootOnly = join(out, 'rootonly');
    mkdirSync(rootOnly, { mode: 0o755 });
    const target = join(rootOnly, 'made', 'deeper', 'file');
    refused(crafted('redir-rootonly', 'nobody', redir(target)), new RegExp(`cannot make the directory of REDIR PATH target ${target}: ${rootOnly} is not writable by the image's processes \\(uid 65534\\)`), [join(rootOnly, 'made')]);
    expect(sandboxProcesses()).toBe('');
  });

  it('refuses a target whose directory leads through a symlink to a /proc magic link, worded so and exit 5 (r375 L2)', () => {
    const mine = join(out, 'nobodys-magic');
    mkdirSync(mine, { mode: 0o755 });
    chownSync(mine, NOBODY, NOBODY);
    // Put there since by the image's user: the restorer's own working
    // directory, by its /proc/self/cwd.
    symlinkSync('/proc/self/cwd', join(mine, 'link'));
    const target = join(mine, 'link', 'made-h377', 'file');
    const code = refused(crafted('redir-magic', 'nobody', redir(target)), new RegExp(`: the directory ${mine}/link/made-h377 of REDIR PATH target ${target} leads through a /proc magic link`));
    expect(code).toBe(5);
    expect(sandboxProcesses()).toBe('');
  });

  it('does not tell a uid-65534 image whether a path only root may see is a directory', () => {
    // /root/.. is searchable by root alone: looked at as 65534 it is "not
    // there", so only the target's parent is made (in its own directory).
    const mine = join(out, 'nobodys');
    mkdirSync(mine, { mode: 0o755 });
    chownSync(mine, NOBODY, NOBODY);
    const secret = mkdtempSync(join(out, 'secret-'));
    chmodSync(secret, 0o700);
    mkdirSync(join(secret, 'dir'));
    const dir = crafted('redir-probe', 'nobody', (i) => void (i.instance = { redirs: [{ kind: 'path', from: join(secret, 'dir'), to: join(mine, 'a', 'b') }], env: [] } as never));
    restores(dir, 'redirprobe', () => {
      expect(existsSync(join(mine, 'a'))).toBe(true);
      expect(existsSync(join(mine, 'a', 'b'))).toBe(false);
    });
  });

  it("a restore killed once it made a target's directory leaves a record by which the next command removes it", async () => {
    const mine = join(out, 'nobodys3');
    mkdirSync(mine, { mode: 0o755 });
    chownSync(mine, NOBODY, NOBODY);
    const dir = crafted('redir-killed', 'nobody', redir(join(mine, 'k', 'l', 'file')));
    const r = spawnSync(process.execPath, [cli, 'restore', dir, '--aid', 'redirkilled'], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: 'restore: redir target directory made' }, encoding: 'utf8' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    expect(existsSync(join(mine, 'k'))).toBe(true);
    // The next command that reads the registry finds the restore dead and
    // removes what its record says it made.
    sb.run(['ps', '-a']);
    await waitFor(() => !existsSync(join(mine, 'k')), 10_000, 'the directory made to be removed');
    expect(sb.aids()).toEqual([]);
  });

  it("still makes an honest target's directories, owned by the image's user", () => {
    const mine = join(out, 'nobodys2');
    mkdirSync(mine, { mode: 0o755 });
    chownSync(mine, NOBODY, NOBODY);
    const target = join(mine, 'x', 'y', 'file');
    restores(crafted('redir-honest', 'nobody', redir(target)), 'redirhonest', () => {
      expect(statSync(join(mine, 'x', 'y')).uid).toBe(NOBODY);
      expect(statSync(join(mine, 'x')).uid).toBe(NOBODY);
    });
  });
});

describe('a chain of incremental parents that does not end (r344 #6)', () => {
  it('refuses an image that is its own parent', () => {
    refused(crafted('self-parent', 'root', (i) => void (i.parent = { path: '.', imageId: 'feedfacefeedface' })), /corrupt image: its parent "\." is not a plain path to another image/);
  });

  it("refuses two images that are each other's parent, through absolute paths", () => {
    const a = join(out, 'loop-a');
    const b = join(out, 'loop-b');
    crafted('loop-b', 'root', (i) => void (i.parent = { path: a, imageId: 'aaaaaaaaaaaaaaaa' }), { id: 'bbbbbbbbbbbbbbbb' });
    crafted('loop-a', 'root', (i) => void (i.parent = { path: b, imageId: 'bbbbbbbbbbbbbbbb' }), { id: 'aaaaaaaaaaaaaaaa' });
    refused(a, /corrupt image: its chain of parents comes back to .*loop-a \(image aaaaaaaaaaaaaaaa\), an image already in it/);
  });

  it('refuses a chain of 65 images, and restores one of 64', () => {
    const link = (n: number) => join(out, `chain-${n}`);
    const id = (n: number) => n.toString(16).padStart(16, '0');
    for (let n = 64; n >= 0; n--) crafted(`chain-${n}`, 'root', (i) => void (n < 64 ? (i.parent = { path: link(n + 1), imageId: id(n + 1) }) : delete i.parent), { id: id(n), own: true });
    refused(link(0), /chain of incremental parents is longer than 64 images/);
    restores(link(1), 'chain64');
  });
});

describe('pseudoterminals no process holds (r344 #8)', () => {
  const pair = () => ({ termios: Buffer.alloc(36), winsize: Buffer.alloc(8), input: Buffer.alloc(0), output: Buffer.alloc(0), packet: false, locked: false, foreground: 0, masterExclusive: true, slaveExclusive: false });
  it('refuses a pty no descriptor and no process names', () => {
    refused(crafted('pty-unheld', 'root', (i) => void (i.ptys = [pair()] as never)), /corrupt image: pty 0 is held by no descriptor and is no process's terminal/);
  });
  it('refuses more ptys than the bound', () => {
    refused(crafted('pty-many', 'root', (i) => void (i.ptys = Array.from({ length: 1025 }, pair) as never)), /corrupt image: it holds 1025 pseudoterminals \(at most 1024\)/);
  });
});

describe.runIf(isRoot)('key files owned by another user (r344 #9)', () => {
  it("refuses a trusted key, or the node's own key, that another user owns", () => {
    const trusted = join(sb.home, 'keys', 'trusted');
    mkdirSync(trusted, { recursive: true, mode: 0o700 });
    const pub = join(trusted, 'other.pub');
    writeFileSync(pub, sb.ok(['key', 'export']), { mode: 0o644 });
    chownSync(pub, NOBODY, NOBODY);
    try {
      refused(base.root.dir, new RegExp(`${pub} belongs to uid 65534, not to uid 0 or root`));
    } finally {
      rmSync(pub);
    }
    const self = join(sb.home, 'keys', 'self.key');
    chownSync(self, NOBODY, NOBODY);
    try {
      refused(base.root.dir, new RegExp(`${self} belongs to uid 65534`));
    } finally {
      chownSync(self, 0, 0);
    }
  });
});
