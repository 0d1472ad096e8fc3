/**
 * A root restore's process maps the files its image maps while it still
 * runs as root (its own credentials are given back last). Each is opened
 * by the restorer as the process (fsident.ts openToMapAs) and that
 * descriptor is handed to the process: the process never opens the name
 * itself. Before, the restorer only checked the name as the process, then
 * the process opened the name again as root: the application's user,
 * owning a directory on the path, could swap it for a symlink between the
 * two, and root mapped a root-only file into the application's memory.
 *
 * The application: privmap (test/fixtures/privmap.c), run as nobody, maps
 * a file of its own directory private and read-only and checks forever
 * that the mapping reads as that file.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import { fileURLToPath } from 'node:url';
import { asNobody, fixture, NOBODY, Sandbox, stoppedAt, waitFor } from './helpers.js';
import { loadImage } from '../src/image/format.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-mapcreds-'));
// nobody walks to its own directory under here.
chmodSync(out, 0o755);
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start, attempt, systemPid } = ownedTests(sb);


/** The one line a refused restore printed (no stack, no second line). */
function refusal(stderr: string): string {
  const lines = stderr.trim().split('\n').filter((l) => l.trim() !== '');
  expect(lines, stderr).toHaveLength(1);
  return lines[0];
}

/** Processes running privmap on a file under `dir`, by their command line. */
function privmapsOf(dir: string): number[] {
  const found: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const argv = readFileSync(`/proc/${e}/cmdline`, 'utf8').split('\0');
      if (argv[0].endsWith('/privmap') && argv[1]?.startsWith(`${dir}/`)) found.push(Number(e));
    } catch {
      /* gone meanwhile */
    }
  }
  return found;
}

/** The application's directory `app` (nobody's), holding d/data (4096
 * bytes of 'p', nobody's), and a root-only directory holding a root-only
 * file of the same name, `secret`'s 4096 bytes: 's', or the same 'p' for
 * a swap made before the restore, which the image's checksum of what it
 * mapped would otherwise refuse first (restore/verify.ts). */
function makeFiles(name: string, secret = 's'): { app: string; data: string; secretDir: string } {
  const app = join(out, name);
  mkdirSync(join(app, 'd'), { recursive: true, mode: 0o755 });
  chownSync(app, NOBODY, NOBODY);
  chownSync(join(app, 'd'), NOBODY, NOBODY);
  const data = join(app, 'd', 'data');
  writeFileSync(data, Buffer.alloc(4096, 'p'), { mode: 0o644 });
  chownSync(data, NOBODY, NOBODY);
  const secretDir = join(out, `${name}-secret`);
  mkdirSync(secretDir, { mode: 0o700 });
  writeFileSync(join(secretDir, 'data'), Buffer.alloc(4096, secret), { mode: 0o600 });
  return { app, data, secretDir };
}

/** What the application's user may do: its directory d put aside and a
 * symlink to the secret's directory put in its place. */
function swapAsNobody(app: string, secretDir: string): void {
  const r = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', 'mv d d.real && ln -s "$1" d', 'sh', secretDir], { cwd: app, encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
}

describe.skipIf(process.getuid?.() !== 0)('a root restore maps the file it opened as the process, not whatever the name holds later', () => {
  // One batch for all the mappings, or (APPSHOT_NO_BATCH=1, as when a
  // process has more mappings than a batch holds) the descriptors handed
  // over in batches of their own.
  for (const [aid, how, env] of [
    ['mc1', 'in the batch that maps them', {}],
    ['mc1n', 'handed over apart from the mappings', { APPSHOT_NO_BATCH: '1' }],
  ] as const) {
    it(`${aid}: its directory swapped for a symlink to a root-only directory between the open as the process and the mapping (descriptors ${how}): the file opened is mapped, never the root-only one, and no descriptor of it is left`, async () => {
    const { app, data, secretDir } = makeFiles(`swapped-${aid}`);
    await start(aid, [...asNobody, fixture('privmap'), data]);
    await sb.checksPass(aid, 2);
    const image = join(out, `${aid}.img`);
    await run(['snapshot', aid, '-o', image]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    const ino = statSync(data).ino;

    const stopped = await stoppedAt(sb, ['restore', image], 'restore: mappings checked', 'the restore to open the mapped files', env);
    swapAsNobody(app, secretDir);
    const { code, stderr } = await stopped.go();
    expect(code, stderr).toBe(0);
    // The application reads its own data (privmap fails on any other
    // byte), from the very file it mapped.
    await sb.checksPass(aid, 3);
    const pid = await systemPid(aid);
    const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n');
    const line = maps.find((l) => l.endsWith('/data'));
    expect(line, maps.join('\n')).toBeDefined();
    expect(line).toContain(`${app}/d.real/data`);
    const range = line!.split(' ')[0];
    expect(statSync(`/proc/${pid}/map_files/${range}`).ino).toBe(ino);
    // The descriptor it was handed is closed once mapped.
    const links = readdirSync(`/proc/${pid}/fd`).map((n) => readlinkSync(`/proc/${pid}/fd/${n}`));
    expect(links.filter((l) => l.includes('/data')), links.join('\n')).toEqual([]);
    await run(['stop', aid, '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
    });
  }

  it('its directory swapped before the restore: refused in one line (exit 5) before the root-only file is read or measured, whatever it holds; no process and no record left; put back, it comes back and reads its data', async () => {
    const { app, data, secretDir } = makeFiles('refused', 'p');
    await start('mc2', [...asNobody, fixture('privmap'), data]);
    await sb.checksPass('mc2', 2);
    const image = join(out, 'mc2.img');
    await run(['snapshot', 'mc2', '-o', image]);
    await waitFor(() => !sb.aids().includes('mc2'), 10_000, 'mc2 to end');

    swapAsNobody(app, secretDir);
    const aidsBefore = sb.aids();
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    // Refused where the mapped files are checked (restore/verify.ts),
    // which opens them as the process too: the root-only file (the same
    // bytes here, which its checksum would have let through) is not read.
    const refusedLine = /\/refused\/d\/data, which the image maps, cannot be opened with the credentials of the process or the application's others \(fsuid 65534, fsgid 65534\): EACCES$/;
    expect(refusal(r.stderr)).toMatch(refusedLine);
    expect(sb.aids()).toEqual(aidsBefore);
    expect(privmapsOf(app)).toEqual([]);

    // Another root-only file, of another size: the same line. Measured as
    // root, its size was printed ("differs from the one the image mapped
    // (N bytes, not 4096)"), one more fact about a file its user may not
    // read with each restore they cause (serve restores on a connection).
    writeFileSync(join(secretDir, 'data'), 'a shorter secret');
    const other = await attempt(['restore', image]);
    expect(other.code, other.stderr).toBe(5);
    expect(refusal(other.stderr)).toMatch(refusedLine);
    expect(other.stderr).not.toMatch(/bytes|differs/);
    expect(sb.aids()).toEqual(aidsBefore);

    // Put back, it comes back and reads its own data.
    rmSync(join(app, 'd'));
    spawnSync('mv', [join(app, 'd.real'), join(app, 'd')]);
    await run(['restore', image]);
    await sb.checksPass('mc2', 3);
    await run(['stop', 'mc2', '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes('mc2'), 10_000, 'mc2 to stop');
    expect(privmapsOf(app)).toEqual([]);
  });
});

// /proc/PID/maps names a mapped file by its dentry's path, which a rename
// follows: the name leads elsewhere only where something else was put on
// it since (a mount over a directory on it; a rename between the snapshot
// reading maps and looking at the name). A tmpfs mounted over the
// directory stands for those here.
describe.skipIf(process.getuid?.() !== 0)('a root snapshot records the file a process maps, not whatever its name leads to by then', () => {
  it("its directory hidden under a mount holding another file of that name: the image records the mapped file's size and inode, and no checksum of the other; unmounted, it comes back", async () => {
    const { data } = makeFiles('overmount');
    await start('mc3', [...asNobody, fixture('privmap'), data]);
    await sb.checksPass('mc3', 2);
    const d = join(out, 'overmount', 'd');
    const ino = BigInt(statSync(data).ino);
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,mode=0755', 'tmpfs', d]);
    expect(m.status, String(m.stderr)).toBe(0);
    try {
      writeFileSync(data, 'a shorter file', { mode: 0o600 });
      const image = join(out, 'mc3.img');
      await run(['snapshot', 'mc3', '-o', image]);
      await waitFor(() => !sb.aids().includes('mc3'), 10_000, 'mc3 to end');
      const { image: got } = await loadImage(image, { trust: 'report' });
      const recorded = got.files.find((f) => f.path === data);
      expect(recorded, got.files.map((f) => f.path).join('\n')).toBeDefined();
      expect([recorded!.size, recorded!.ino, recorded!.crc32c]).toEqual([4096n, ino, 0]);
    } finally {
      spawnSync('umount', ['-l', d]);
    }
    await run(['restore', join(out, 'mc3.img')]);
    await sb.checksPass('mc3', 3);
    await run(['stop', 'mc3', '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes('mc3'), 10_000, 'mc3 to stop');
  });
});

describe.skipIf(process.getuid?.() !== 0)('what the restorer opens as a process never becomes its terminal', () => {
  it("a pty of the application's user at a name the image gives, opened by a restorer without a terminal (the engine, serve under a service manager): its terminal stays none", () => {
    // A pty whose slave nobody owns (nobody made it), held open meanwhile.
    const ptyHolder = `import os, sys, time
m, s = os.openpty()
print(os.ttyname(s), flush=True)
sys.stdin.read()`;
    const root = fileURLToPath(new URL('..', import.meta.url));
    // The restorer's open as nobody, in a session of its own with no
    // terminal (setsid): O_NOCTTY or the kernel makes the pty its terminal.
    const script = `
      import { spawn } from 'node:child_process';
      import { readFileSync } from 'node:fs';
      import { addon } from ${JSON.stringify(join(root, 'dist', 'native.js'))};
      const p = spawn('setpriv', ${JSON.stringify([...asNobody.slice(1), '/usr/bin/python3', '-c'])}.concat([${JSON.stringify(ptyHolder)}]), { stdio: ['pipe', 'pipe', 'inherit'] });
      p.stdout.once('data', (d) => {
        const pty = d.toString().trim();
        const ttyNr = () => Number(readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ')[4]);
        const before = ttyNr();
        let opened = false;
        try { addon().openAs(pty, 2, 0, [{ fsuid: ${NOBODY}, fsgid: ${NOBODY}, groups: [], capEff: 0n }]); opened = true; } catch (e) { opened = e.code; }
        console.log(JSON.stringify({ pty, before, after: ttyNr(), opened }));
        p.stdin.end();
      });`;
    const r = spawnSync('setsid', ['-w', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const got = JSON.parse(r.stdout) as { pty: string; before: number; after: number; opened: boolean | string };
    expect(got.pty).toMatch(/^\/dev\/pts\/\d+$/);
    expect(got.opened).toBe(true);
    expect([got.before, got.after]).toEqual([0, 0]);
  });
});
