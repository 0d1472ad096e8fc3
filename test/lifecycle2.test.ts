/**
 * The whole life of an application, as docker's containers have it: an
 * ended application is kept with its exit code, end time and log until
 * `rm` or `prune` (its kernel objects go at once); `ps -a/-q`, `wait`,
 * `stop -t` escalating to SIGKILL, `kill`, `rm -f`; a clone's `rm` leaves
 * nothing of it (private copies, REDIR PATH directories, port claims); a
 * log goes on across a snapshot and the restore of its image; a foreground
 * `run` whose application is snapshotted says where it went.
 */
import { spawn, spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { alive, cli, command, fixture, processesWithArgument, processState, Sandbox, spawnAsync, stoppedAt, tcpExchange, templfixTemplate, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

// Tests of twenty commands and more in a row: on a loaded machine each
// command takes seconds (its Node start alone), and the suite's minute
// is not enough. Only a bound on a hung test: nothing here is timed.
vi.setConfig({ testTimeout: 240_000 });

const sb = new Sandbox();
const dir = scratchDir('appshot-life-');
afterAll(() => sb.dispose());

interface PsApp {
  aid: string;
  state: 'running' | 'exited' | 'restoring' | 'snapshotted';
  snapshottedAt?: string;
  command: string[];
  exitCode?: number;
  lost?: boolean;
  endedAt?: string;
  createdAt: string;
  image?: string;
  template?: { path: string; instance: number };
  privateRoot?: string;
  ports: { virtual: number; system: number; mode: string }[];
  processes: { vpid: number; pid: number; init: boolean; command: string; argv: string[] }[];
}

const psAll = () => sb.json<PsApp[]>(['ps', '-a']);
const app = (aid: string) => psAll().find((a) => a.aid === aid);
const tableFilesOf = (aid: string) => sb.shmFiles().filter((f) => f.includes(`-${aid}-`));
/** A detached application that prints READY and then ignores SIGTERM. */
const STUBBORN = ['sh', '-c', 'trap "" TERM; echo READY; while :; do sleep 0.1; done'];

async function runDetached(aid: string, command: string[], ready?: RegExp): Promise<PsApp> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...command]);
  expect(r.code, r.stderr).toBe(0);
  if (ready) await waitFor(() => ready.test(sb.run(['logs', aid]).stdout), 30_000, `${aid} to start`);
  return app(aid)!;
}

describe('an ended application', () => {
  it('is kept with its exit code, end time and log; its kernel objects go at once', async () => {
    await runDetached('ends', ['sh', '-c', 'echo first; echo second; exit 7']);
    const w = await sb.runAsync(['wait', 'ends']);
    expect(w.stdout).toBe('7\n');
    expect(w.code).toBe(7);
    const a = app('ends')!;
    expect(a).toMatchObject({ state: 'exited', exitCode: 7, ports: [], processes: [] });
    expect(Date.parse(a.endedAt!)).toBeGreaterThanOrEqual(Date.parse(a.createdAt));
    expect(tableFilesOf('ends')).toEqual([]);
    expect((await sb.runAsync(['logs', 'ends'])).stdout).toBe('first\nsecond\n');
    expect((await sb.runAsync(['logs', '--tail', '1', 'ends'])).stdout).toBe('second\n');
    expect((await sb.runAsync(['logs', '-f', 'ends'])).stdout).toBe('first\nsecond\n');
    // Listed with -a only; -q prints AIDs.
    expect((await sb.jsonAsync<PsApp[]>(['ps'])).map((x) => x.aid)).not.toContain('ends');
    expect((await sb.runAsync(['ps', '-q'])).stdout.split('\n')).not.toContain('ends');
    expect((await sb.runAsync(['ps', '-aq'])).stdout.split('\n')).toContain('ends');
    const table = (await sb.runAsync(['ps', '-a'])).stdout;
    expect(table.split('\n')[0]).toMatch(/^AID\s+STATE\s+AGE\s+PROCS\s+IMAGE\s+PORTS\s+COMMAND$/);
    // An age in one unit, seconds under a minute (a loaded machine may
    // take one).
    expect(table).toMatch(/^ends\s+exited \(7\) \d+[sm] ago\s/m);
    const { duration } = await import('../src/words.js');
    expect([59_999, 60_000, 106_000, 3_599_999, 3_600_000, 86_400_000].map(duration)).toEqual(['59s', '1m', '1m', '59m', '1h', '1d']);
    // Commands that need it running say it has ended.
    const s = await sb.runAsync(['stop', 'ends']);
    expect(s.code).toBe(1);
    expect(s.stderr).toMatch(/'ends' is not running \(exited with code 7 at .*'appshot rm ends' removes it\)/);
    // With others named: none is acted on, and the line says so.
    sb.ok(['run', '-d', '--aid', 'bystander', '--', 'sleep', '600']);
    for (const [verb, done] of [['stop', 'stopped'], ['kill', 'signalled']]) {
      const both = await sb.runAsync([verb, 'bystander', 'ends']);
      expect(both.code, verb).toBe(1);
      expect(both.stderr, verb).toMatch(new RegExp(`'ends' is not running .*; none was ${done} \\('bystander' left as before\\)\n$`));
      expect((await sb.jsonAsync<PsApp[]>(['ps'])).map((x) => x.aid), verb).toContain('bystander');
    }
    expect((await sb.runAsync(['rm', '-f', 'bystander'])).code).toBe(0);
    // Its AID stays taken until it is removed, as a container's name.
    const again = await sb.runAsync(['run', '--aid', 'ends', '--', 'true']);
    expect(again.code).toBe(4);
    expect(again.stderr).toMatch(/AID 'ends' is in use by an application that has ended .*'appshot rm ends' removes it/);
    const rm = await sb.runAsync(['rm', 'ends']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(sb.allAids()).not.toContain('ends');
    expect((await sb.runAsync(['logs', 'ends'])).code).toBe(3);
    expect((await sb.runAsync(['run', '--aid', 'ends', '--', 'true'])).code).toBe(0);
    expect((await sb.runAsync(['rm', 'ends'])).code).toBe(0);
  });

  it('keeps a foreground application too, with its exit code', () => {
    expect(sb.run(['run', '--aid', 'fg5', '--', 'sh', '-c', 'exit 5']).code).toBe(5);
    expect(app('fg5')).toMatchObject({ state: 'exited', exitCode: 5 });
    const logs = sb.run(['logs', 'fg5']);
    // The AID is right and the command well formed: a failure, not a
    // usage error (exit 2).
    expect(logs.code).toBe(1);
    expect(logs.stderr).toBe("appshot: 'fg5' ran in the foreground: its output went to the terminal of 'appshot run', and no log was kept\n");
    expect(sb.run(['rm', 'fg5']).code).toBe(0);
  });

  it('refuses a bad --tail', async () => {
    await runDetached('ts', ['sh', '-c', 'echo x']);
    expect(sb.run(['wait', 'ts']).code).toBe(0);
    expect(sb.run(['logs', '--tail', 'x', 'ts']).code).toBe(2);
    // Before anything else is looked at or said.
    const bad = sb.run(['logs', '--tail', '-3', 'no-such-app']);
    expect([bad.code, bad.stderr]).toEqual([2, "appshot: --tail '-3': expected a number of lines or 'all'\n"]);
    expect(sb.run(['logs', '--tail', '0', 'ts']).stdout).toBe('');
    expect(sb.run(['rm', 'ts']).code).toBe(0);
  });
});

describe('ps of an argv with control characters, spaces and an empty argument', () => {
  it('quotes each argument as a shell needs it and writes control characters as escapes: one row per application and per process, no terminal escape', async () => {
    const argv = ['sh', '-c', 'echo READY; sleep 60', 'line\nbreak\ttab\x1b[31mred\x07', '', "it's"];
    await runDetached('ctl', argv, /READY/);
    const shown = "sh -c 'echo READY; sleep 60' 'line\\nbreak\\ttab\\e[31mred\\x07' '' 'it'\\''s'";
    const list = sb.run(['ps']).stdout.split('\n').filter(Boolean);
    expect(list).toHaveLength(2);
    expect(list[1]).toMatch(new RegExp(`^ctl\\s+running\\s.*\\s${shown.replace(/[\\[\]]/g, '\\$&')}$`));
    // Its processes, from /proc/PID/cmdline: init, sh, sleep.
    const processes = sb.run(['ps', 'ctl']).stdout.split('\n').filter(Boolean);
    expect(processes).toHaveLength(4);
    expect(processes[2].endsWith(` ${shown}`), processes[2]).toBe(true);
    expect(processes[3]).toMatch(/\ssleep 60$/);
    // --json keeps the argv as it is.
    expect(app('ctl')!.processes.map((p) => p.command)).toEqual(['[appshot-init]', argv.join(' '), 'sleep 60']);
    expect(app('ctl')!.processes.map((p) => p.argv)).toEqual([[], argv, ['sleep', '60']]);
    expect(sb.json<{ command: string[] }[]>(['ps', 'ctl'])[0].command).toEqual(argv);
    expect(sb.run(['rm', '-f', 'ctl']).code).toBe(0);
  });
});

describe('ports', () => {
  // Listens on one IPv4 port in its first process and one IPv6 port in a
  // child, ports the kernel picks; no rule translates them.
  const LISTENER = `
import os, socket, sys, time
def listen(family, host):
    s = socket.socket(family)
    s.bind((host, 0))
    s.listen()
    return s
four = listen(socket.AF_INET, '127.0.0.1')
r, w = os.pipe()
if os.fork() == 0:
    six = listen(socket.AF_INET6, '::1')
    os.write(w, str(six.getsockname()[1]).encode())
    while True: time.sleep(1)
print('READY', four.getsockname()[1], os.read(r, 16).decode(), flush=True)
while True: time.sleep(1)
`;

  it('ps and port list every port the processes listen on, untranslated ones as direct', async () => {
    await runDetached('listener', ['python3', '-c', LISTENER], /^READY \d+ \d+$/m);
    const [, four, six] = /^READY (\d+) (\d+)$/m.exec(sb.run(['logs', 'listener']).stdout)!.map(Number);
    const sorted = [four, six].sort((a, b) => a - b);
    expect(app('listener')!.ports).toEqual(sorted.map((p) => ({ virtual: p, system: p, mode: 'direct' })));
    expect(sb.run(['ps']).stdout).toMatch(new RegExp(`^listener\\s+running\\s+\\S+\\s+2\\s+-\\s+${sorted.join(', ')}\\s+python3`, 'm'));
    const table = sb.run(['port', 'listener']).stdout.trim().split('\n');
    expect(table.map((l) => l.split(/\s{2,}/))).toEqual([['PORT', 'HOST PORT', 'MODE'], ...sorted.map((p) => [String(p), String(p), 'direct'])]);
    expect(sb.run(['port', 'listener', String(six)]).stdout).toBe(`${six}\n`);
    const none = sb.run(['port', 'listener', '1']);
    expect([none.code, none.stderr]).toEqual([3, "appshot: 'listener' does not listen on port 1\n"]);
    const bad = sb.run(['port', 'listener', 'http']);
    expect([bad.code, bad.stderr]).toEqual([2, "appshot: 'http' is not a TCP port (1-65535)\n"]);
    expect(sb.run(['rm', '-f', 'listener']).code).toBe(0);
  });
});

describe('wait, stop, kill', () => {
  it('wait blocks until each ends, prints their codes and exits with the last', async () => {
    // Each ends when told to (a file appears), not after a time: wait is
    // seen blocked on w2 whatever the machine's load.
    const go = (name: string) => join(dir, `go-${name}`);
    const until = (name: string, code: number) => ['sh', '-c', `while [ ! -e ${go(name)} ]; do sleep 0.05; done; exit ${code}`];
    await runDetached('w1', until('w1', 3));
    await runDetached('w2', until('w2', 4));
    const w = spawn(process.execPath, [cli, 'wait', 'w1', 'w2'], { env: sb.env });
    let stdout = '';
    w.stdout.on('data', (d) => (stdout += d));
    const exited = new Promise<number | null>((resolve) => w.on('close', (code) => resolve(code)));
    writeFileSync(go('w1'), '');
    await waitFor(() => stdout === '3\n', 15_000, "wait to print w1's code");
    // w1 has ended, w2 runs: wait is still waiting.
    expect(app('w2')!.state).toBe('running');
    expect(w.exitCode).toBeNull();
    writeFileSync(go('w2'), '');
    expect(await exited).toBe(4);
    expect(stdout).toBe('3\n4\n');
    // --json: one element per AID in the order given; the status the last one's.
    const j = sb.run(['wait', 'w2', 'w1', '--json']);
    expect([j.code, j.stderr]).toEqual([3, '']);
    expect(JSON.parse(j.stdout)).toEqual([
      { schema: 'appshot.wait/1', aid: 'w2', exitCode: 4, endedAt: app('w2')!.endedAt },
      { schema: 'appshot.wait/1', aid: 'w1', exitCode: 3, endedAt: app('w1')!.endedAt },
    ]);
    expect(sb.run(['wait', 'nope']).code).toBe(3);
    expect(sb.run(['rm', 'w1', 'w2']).code).toBe(0);
  });

  it('stop -t escalates to SIGKILL on a program that ignores SIGTERM, and returns only when it is gone', async () => {
    const a = await runDetached('stubborn', STUBBORN, /READY/);
    // Its init and its shell: the shell's sleeps come and go, and a PID of
    // one that ended may be another process's by now.
    const pids = a.processes.filter((p) => p.vpid <= 2).map((p) => p.pid);
    const started = Date.now();
    const s = sb.run(['stop', '-t', '1', 'stubborn']);
    const took = Date.now() - started;
    expect(s.code, s.stderr).toBe(0);
    // The grace period was given (a lower bound holds on any machine).
    expect(took).toBeGreaterThanOrEqual(1000);
    // Gone when stop returned: no process, no tables, recorded as killed.
    for (const pid of pids) expect(alive(pid)).toBe(false);
    expect(tableFilesOf('stubborn')).toEqual([]);
    expect(app('stubborn')).toMatchObject({ state: 'exited', exitCode: 137 });
    expect(sb.run(['rm', 'stubborn']).code).toBe(0);
  });

  it('stop ends a program that obeys SIGTERM within the grace period', async () => {
    await runDetached('obeys', [fixture('waiter')], /READY/);
    // A grace period longer than the test's own time limit: stop returning
    // at all shows it returned when the program ended, not when the period
    // ran out.
    expect(sb.run(['stop', '-t', '3600', 'obeys']).code).toBe(0);
    expect(app('obeys')).toMatchObject({ state: 'exited', exitCode: 143 });
    expect(sb.run(['rm', 'obeys']).code).toBe(0);
  });

  it('kill sends one signal and returns; SIGKILL by default', async () => {
    await runDetached('k', [fixture('waiter')], /READY/);
    expect(sb.run(['kill', '-s', 'HUP', 'k']).code).toBe(0);
    await waitFor(() => sb.run(['logs', 'k']).stdout.includes('HUP'), 30_000, 'HUP in the log');
    expect(app('k')!.state).toBe('running');
    expect(sb.run(['kill', 'k']).code).toBe(0);
    expect(sb.run(['wait', 'k']).stdout).toBe('137\n');
    expect(sb.run(['kill', '-s', 'NOPE', 'k']).code).toBe(2);
    expect(sb.run(['rm', 'k']).code).toBe(0);
  });
});

describe('a signal passed on by init after a restore', () => {
  it('reaches the first process alone, as before the snapshot, not its children too (an sshd session dies of the listener\'s reload signal)', async () => {
    // The child counts the SIGHUPs it gets; the first process answers its
    // own by asking the child, with a SIGUSR1 sent after any SIGHUP init
    // sent it.
    const script = [
      '(hups=0; trap "hups=\\$((hups+1))" HUP; trap "echo child saw \\$hups SIGHUP" USR1; echo CHILD; while :; do sleep 0.1; done) & child=$!',
      'trap "echo first got SIGHUP; kill -USR1 $child" HUP',
      'echo READY; while :; do sleep 0.1; done',
    ].join('\n');
    await runDetached('sigfw', ['bash', '-c', script], /READY[\s\S]*CHILD|CHILD[\s\S]*READY/);
    expect(sb.run(['snapshot', 'sigfw', '-o', join(dir, 'sigfw')]).code).toBe(0);
    const r = sb.run(['restore', join(dir, 'sigfw')]);
    expect(r.code, r.stderr).toBe(0);
    expect(sb.run(['kill', '-s', 'HUP', 'sigfw']).code).toBe(0);
    await waitFor(() => /child saw \d+ SIGHUP/.test(sb.run(['logs', 'sigfw']).stdout), 30_000, "the child's answer");
    const log = sb.run(['logs', 'sigfw']).stdout;
    expect(log).toMatch(/first got SIGHUP\n/);
    expect(log).toMatch(/child saw 0 SIGHUP\n/);
    expect(sb.run(['rm', '-f', 'sigfw']).code).toBe(0);
  });
});

describe('rm and prune', () => {
  it('rm refuses a running application; rm -f kills it and leaves nothing', async () => {
    // Its init and its shell (the shell's sleeps come and go).
    const a = await runDetached('live', STUBBORN, /READY/);
    a.processes = a.processes.filter((p) => p.vpid <= 2);
    const r = sb.run(['rm', 'live']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/'live' is running: stop it first .* 'appshot rm -f live'/);
    expect(a.processes.every((p) => alive(p.pid))).toBe(true);
    const f = sb.run(['rm', '-f', 'live']);
    expect(f.code, f.stderr).toBe(0);
    for (const p of a.processes) expect(alive(p.pid)).toBe(false);
    expect(sb.allAids()).not.toContain('live');
    expect(tableFilesOf('live')).toEqual([]);
  });

  it('prune removes every ended application and leaves running ones', async () => {
    await runDetached('p1', ['true']);
    await runDetached('p2', ['false']);
    await runDetached('p3', [fixture('waiter')], /READY/);
    expect(sb.run(['wait', 'p1', 'p2']).stdout).toBe('0\n1\n');
    const p = sb.run(['prune']);
    expect(p.code).toBe(0);
    // (And any ended application an earlier test left, were it to fail.)
    expect(p.stdout.split('\n').filter(Boolean)).toEqual(expect.arrayContaining(['p1', 'p2']));
    expect(sb.allAids()).toEqual(['p3']);
    expect(sb.run(['rm', '-f', 'p3']).code).toBe(0);
  });
});

describe('logs across a snapshot and its restore', () => {
  it('logs --timestamps: each line with when it was written, kept across a snapshot and its restore', async () => {
    const go = (n: number) => join(dir, `ts-go-${n}`);
    const waitGo = (n: number) => `while [ ! -e ${go(n)} ]; do sleep 0.02; done`;
    const t0 = Date.now();
    await runDetached('stamped', ['sh', '-c', `echo first; ${waitGo(1)}; echo second; ${waitGo(2)}; echo third; while :; do sleep 1; done`], /first\n/);
    // Init notes the times without an inotify instance: those (128 per
    // user) are the applications' own.
    const initPid = JSON.parse(readFileSync(join(sb.home, 'apps', 'stamped', 'app.json'), 'utf8')).initPid as number;
    expect(readdirSync(`/proc/${initPid}/fd`).map((fd) => readlinkSync(`/proc/${initPid}/fd/${fd}`))).not.toContain('anon_inode:inotify');
    const tA = Date.now();
    writeFileSync(go(1), '');
    await waitFor(() => sb.run(['logs', 'stamped']).stdout.includes('second\n'), 30_000, 'the second line');
    const image = join(dir, 'stamped.appshot');
    expect((await sb.runAsync(['snapshot', 'stamped', '-o', image])).code).toBe(0);
    // Snapshotted: its carried log keeps its times.
    const waiting = await sb.runAsync(['logs', '-t', 'stamped']);
    expect(waiting.code, waiting.stderr).toBe(0);
    expect(waiting.stdout.split('\n').filter(Boolean).map((l) => l.split(' ')[1])).toEqual(['first', 'second']);
    expect((await sb.runAsync(['restore', image])).code).toBe(0);
    const tC = Date.now();
    writeFileSync(go(2), '');
    await waitFor(() => sb.run(['logs', 'stamped']).stdout.includes('third\n'), 30_000, 'the third line, after the restore');
    const r = await sb.runAsync(['logs', '--timestamps', 'stamped']);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.split('\n').filter(Boolean).map((l) => /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$/.exec(l));
    expect(lines.every(Boolean), r.stdout).toBe(true);
    const at = Object.fromEntries(lines.map((m) => [m![2], Date.parse(m![1])]));
    expect(Object.keys(at)).toEqual(['first', 'second', 'third']);
    // Each no earlier than what made it be written, and in order.
    expect(at.first).toBeGreaterThanOrEqual(t0 - 1);
    expect(at.second).toBeGreaterThanOrEqual(tA);
    expect(at.third).toBeGreaterThanOrEqual(tC);
    // Noted as it came, not all at the log's last write: the second line's
    // time is from before the restore returned.
    expect(at.second).toBeLessThanOrEqual(tC);
    expect(at.third).toBeLessThanOrEqual(Date.now());
    expect((await sb.runAsync(['logs', '-t', '--tail', '1', 'stamped'])).stdout).toMatch(/^\S+Z third\n$/);
    expect((await sb.runAsync(['rm', '-f', 'stamped'])).code).toBe(0);

    // A log the application truncates: its times start afresh, so a line
    // written after is not given the time of one the truncation removed.
    const timesOf = (aid: string) => readFileSync(join(sb.home, 'apps', aid, '.log.times'), 'latin1').trim();
    await runDetached('truncated', ['sh', '-c', `echo 0123456789; ${waitGo(5)}; truncate -s 0 /dev/stdout; echo new; ${waitGo(3)}; echo later; while :; do sleep 1; done`], /^0123456789\n/);
    await waitFor(() => timesOf('truncated').endsWith(' 11'), 30_000, 'the record of the first line');
    writeFileSync(go(5), '');
    await waitFor(() => sb.log('truncated') === 'new\n' && timesOf('truncated').endsWith(' 4'), 30_000, 'the record of the truncated log');
    const tD = Date.now();
    writeFileSync(go(3), '');
    await waitFor(() => sb.log('truncated').includes('later\n'), 30_000, 'the line after');
    const cutLines = (await sb.runAsync(['logs', '-t', 'truncated'])).stdout.split('\n').filter(Boolean).map((l) => l.split(' '));
    expect(cutLines.map((l) => l[1])).toEqual(['new', 'later']);
    expect(Date.parse(cutLines[0][0])).toBeLessThanOrEqual(tD);
    // Before, the records after the truncation were ignored, and this line
    // (ending at byte 10, within the first line's 11) took its time.
    expect(Date.parse(cutLines[1][0])).toBeGreaterThanOrEqual(tD);

    // A times file grown to init's limit is thinned, its span kept: padded
    // here (as a chatty application would make it over hours) while the
    // application is snapshotted, then one more line after the restore.
    await runDetached('chatty', ['sh', '-c', `echo start; ${waitGo(4)}; echo more; while :; do sleep 1; done`], /start\n/);
    const chattyImage = join(dir, 'chatty.appshot');
    const chattySnap = await sb.runAsync(['snapshot', 'chatty', '-o', chattyImage]);
    expect(chattySnap.code, chattySnap.stderr).toBe(0);
    const carriedTimes = join(sb.home, 'logs', '.chatty.times');
    const [firstMs] = readFileSync(carriedTimes, 'latin1').split(' ').map(Number);
    // Records for bytes the log has not reached yet are harmless: each
    // line takes the first record covering its end.
    const padding = Array.from({ length: 20_000 }, (_, i) => `${firstMs + i} 6\n`).join('');
    appendFileSync(carriedTimes, padding);
    const chattyBack = await sb.runAsync(['restore', chattyImage]);
    expect(chattyBack.code, chattyBack.stderr).toBe(0);
    const tE = Date.now();
    writeFileSync(go(4), '');
    await waitFor(() => sb.log('chatty').includes('more\n'), 30_000, 'the line after the restore');
    const times = join(sb.home, 'apps', 'chatty', '.log.times');
    await waitFor(() => readFileSync(times, 'latin1').trim().endsWith(' 11'), 30_000, 'the record of the last line');
    expect(statSync(times).size).toBeLessThan(256 * 1024);
    const chattyLines = (await sb.runAsync(['logs', '-t', 'chatty'])).stdout.split('\n').filter(Boolean).map((l) => l.split(' '));
    expect(chattyLines.map((l) => l[1])).toEqual(['start', 'more']);
    expect(Date.parse(chattyLines[0][0])).toBe(firstMs);
    expect(Date.parse(chattyLines[1][0])).toBeGreaterThanOrEqual(tE);
    for (const aid of ['truncated', 'chatty']) expect((await sb.runAsync(['rm', '-f', aid])).code).toBe(0);

    // A last line without its newline is printed too, followed or not.
    await runDetached('unended', ['sh', '-c', 'printf "a\\nb"']);
    expect((await sb.runAsync(['wait', 'unended'])).code).toBe(0);
    for (const args of [['logs', '-t', 'unended'], ['logs', '-f', '-t', 'unended']])
      expect((await sb.runAsync(args)).stdout.split('\n').map((l) => l.replace(/^\S+Z /, '')), args.join(' ')).toEqual(['a', 'b']);
    expect((await sb.runAsync(['rm', 'unended'])).code).toBe(0);
  });

  it('a snapshot that ends an application leaves it in ps -a as snapshotted, with its image and when, until its restore takes its place, rm or prune', async () => {
    const command = ['sh', '-c', 'echo READY; while :; do sleep 0.1; done'];
    await runDetached('kept', command, /READY/);
    const image = join(dir, 'kept.appshot');
    const t0 = Date.now();
    expect(sb.run(['snapshot', 'kept', '-o', image]).code).toBe(0);
    const a = app('kept')!;
    expect(a).toMatchObject({ state: 'snapshotted', image, command, detached: true, ports: [], processes: [] });
    expect(Date.parse(a.snapshottedAt!)).toBeGreaterThanOrEqual(Math.floor(t0 / 1000) * 1000);
    expect(Date.parse(a.snapshottedAt!)).toBeGreaterThanOrEqual(Date.parse(a.createdAt));
    expect(sb.run(['ps', '-a']).stdout).toMatch(new RegExp(`^kept\\s+snapshotted \\d+[sm] ago\\s+\\d+[sm]\\s+0\\s+${image}\\s+-\\s+sh -c 'echo READY; while :; do sleep 0.1; done'$`, 'm'));
    expect(sb.run(['ps', '-aq']).stdout.split('\n')).toContain('kept');
    expect(sb.run(['ps', '-q']).stdout.split('\n')).not.toContain('kept');
    expect(sb.run(['ps', '-a', 'kept']).stdout).toMatch(new RegExp(`^kept: snapshotted \\d+[sm] ago \\(${image}\\)\n$`));
    // Commands that need it running, or its exit code, say where it went.
    const stop = sb.run(['stop', 'kept']);
    expect([stop.code, stop.stderr]).toEqual([1, `appshot: 'kept' is not running: it was snapshotted to ${image} at ${a.snapshottedAt} (restore the image, or 'appshot rm kept' removes its record)\n`]);
    expect(sb.run(['wait', 'kept']).code).toBe(1);
    expect(sb.run(['wait', 'kept', '--json'])).toMatchObject({ code: 1, stdout: '' });
    // Its AID is taken but for the restore of an image: run is refused...
    const again = sb.run(['run', '--aid', 'kept', '--', 'true']);
    expect([again.code, again.stderr]).toEqual([4, `appshot: AID 'kept' is in use by an application that was snapshotted to ${image} at ${a.snapshottedAt}: restore the image, or 'appshot rm kept' removes its record\n`]);
    expect(sb.allAids()).not.toContain('kept');
    // ...while the restore takes its place without asking, as before.
    // Given as a path relative to where it ran: --json and ps name the
    // image as snapshot did, by its absolute path.
    const r = spawnSync(process.execPath, [cli, 'restore', 'kept.appshot', '--json'], { env: sb.env, cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ aid: 'kept', image });
    expect(psAll().filter((x) => x.aid === 'kept').map((x) => x.state)).toEqual(['running']);
    // Its registration names the image it came from (ps's IMAGE).
    expect(app('kept')).toMatchObject({ state: 'running', image });
    expect(sb.run(['ps', '-a']).stdout).toMatch(new RegExp(`^kept\\s+running\\s+\\d+[sm]\\s+\\d+\\s+${image}\\s`, 'm'));
    // rm of a snapshotted one: its record and the log that waited, not its image.
    expect(sb.run(['snapshot', 'kept', '-o', join(dir, 'kept2.appshot')]).code).toBe(0);
    expect(app('kept')).toMatchObject({ state: 'snapshotted', image: join(dir, 'kept2.appshot') });
    expect(existsSync(join(sb.home, 'logs', 'kept'))).toBe(true);
    const rm = sb.run(['rm', 'kept']);
    expect([rm.code, rm.stdout]).toEqual([0, 'kept\n']);
    expect(app('kept')).toBeUndefined();
    expect(existsSync(join(sb.home, 'logs', 'kept'))).toBe(false);
    expect(existsSync(join(dir, 'kept2.appshot'))).toBe(true);
    expect(sb.run(['logs', 'kept']).code).toBe(3);
    // prune takes snapshotted ones too; a foreground one has no log to wait.
    const fg = sb.start(['run', '--aid', 'keptfg', '--', 'sh', '-c', 'echo READY; exec </dev/null >/dev/null 2>&1; while :; do sleep 0.1; done']);
    await fg.line(/^READY$/);
    expect(sb.run(['snapshot', 'keptfg', '-o', join(dir, 'keptfg.appshot')]).code).toBe(0);
    expect(app('keptfg')).toMatchObject({ state: 'snapshotted', detached: false });
    const logs = sb.run(['logs', 'keptfg']);
    expect([logs.code, logs.stderr]).toEqual([1, "appshot: 'keptfg' ran in the foreground: its output went to the terminal of 'appshot run', and no log was kept\n"]);
    const prune = sb.run(['prune']);
    expect([prune.code, prune.stdout.split('\n')]).toEqual([0, expect.arrayContaining(['keptfg'])]);
    expect(app('keptfg')).toBeUndefined();
  });

  it('the restored application appends to the log it had', async () => {
    await runDetached('counter', ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo "line $i"; sleep 0.05; done'], /line 3\n/);
    const image = join(dir, 'counter.appshot');
    const s = sb.run(['snapshot', 'counter', '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    // A snapshot releases the AID (no ended record): it restores at once.
    expect(sb.allAids()).not.toContain('counter');
    const before = readFileSync(join(sb.home, 'logs', 'counter'), 'utf8');
    const waiting = sb.run(['logs', 'counter']);
    expect(waiting.stdout).toBe(before);
    expect(waiting.stderr).toMatch(/'counter' was snapshotted and ended; its log waits for the restore/);
    const last = Number(/line (\d+)\n$/.exec(before)![1]);
    // A restore killed before its commit gives the log back: killed once
    // it has taken them over (fds), and just after its registration said
    // it takes them, before it moved them (registered).
    for (const at of ['restore: registered', 'restore: fds']) {
      const killed = spawnSync(process.execPath, [cli, 'restore', image], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: at } });
      expect(killed.signal, at).toBe('SIGKILL');
      // The next command settles it, once the restore's supervisor (a
      // standby taken before the kill) has seen its lifeline go: each poll
      // is such a command, as a person's next `ps` would be.
      await waitFor(() => sb.run(['ps', '-a']).code === 0 && !sb.allAids().includes('counter'), 30_000, `the restore abandoned at '${at}' to go`);
      expect(readFileSync(join(sb.home, 'logs', 'counter'), 'utf8'), at).toBe(before);
      // And the record of the snapshot, which it had taken over.
      expect(app('counter'), at).toMatchObject({ state: 'snapshotted', image });
    }
    const r = sb.run(['restore', image]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.run(['logs', 'counter']).stdout.includes(`line ${last + 3}\n`), 30_000, 'the restored counter to go on');
    const after = sb.run(['logs', 'counter']).stdout;
    expect(after.startsWith(before)).toBe(true);
    expect(existsSync(join(sb.home, 'logs', 'counter'))).toBe(false);
    expect(sb.run(['logs', '--tail', '2', 'counter']).stdout.split('\n')).toHaveLength(3);
    expect(app('counter')).toMatchObject({ state: 'running', image });
    // The restored command is virtual PID 2: its end gives the exit code.
    expect(sb.run(['stop', 'counter']).code).toBe(0);
    expect(app('counter')).toMatchObject({ state: 'exited', exitCode: 143 });
    expect(sb.run(['rm', 'counter']).code).toBe(0);
  });

  it('a foreground run whose application is snapshotted says where it went and exits 0', async () => {
    // Its standard streams let go of the test's (sockets, which a snapshot
    // cannot capture yet) once it has said READY.
    const fg = sb.start(['run', '--aid', 'fgsnap', '--', 'sh', '-c', 'echo READY; exec </dev/null >/dev/null 2>&1; while :; do sleep 0.1; done']);
    await fg.line(/^READY$/);
    const image = join(dir, 'fgsnap.appshot');
    const s = sb.run(['snapshot', 'fgsnap', '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    const r = await fg.exited;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe(`appshot: 'fgsnap' was snapshotted to ${image} and ended\n`);
    expect(sb.allAids()).not.toContain('fgsnap');
    expect(sb.run(['restore', image]).code).toBe(0);
    expect(sb.run(['rm', '-f', 'fgsnap']).code).toBe(0);
  });
});

describe('kill, stop and rm -f of an application whose supervisor is not on record yet', () => {
  // `run` records its supervisor's PID a moment after starting it, and the
  // application may print first (CI's race, as the foreground snapshot
  // above had it). `run` stops itself at that moment here (its test point
  // 'run: init spawned'), however long the moment is.
  const RUN_POINT = 'run: init spawned';
  // And the command, once it has read the record as running and is about
  // to wait for that PID: the application then ends meanwhile.
  const WAIT_POINT = 'signal: waiting for the supervisor';

  it('a signal sent as soon as a foreground application prints goes to its first process only', async () => {
    // kill acted on that output with a record naming no supervisor, and
    // sent the signal straight to every process, as it does while a
    // restore is under way. The first process ends its child itself on
    // SIGHUP, once kill has returned (the file "go"), and says how the
    // child ended: by SIGTERM (143) if only the first process had the HUP;
    // by SIGHUP (129) if the child had one too.
    const go = join(dir, 'fghup.go');
    const script =
      'sleep 1236 </dev/null >/dev/null 2>&1 & c=$!; ' +
      'trap \'while [ ! -e "$0" ]; do sleep 0.02; done; kill -TERM $c; wait $c; echo "CHILD-ENDED $?"; exit 0\' HUP; ' +
      'echo READY; while :; do wait; done';
    // The library's kill, in this process: it reads the record while `run`
    // is stopped, with no supervisor on it for certain.
    const api = await import('../src/api.js');
    const fg = sb.start(['run', '--aid', 'fghup', '--', 'sh', '-c', script, go], { APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: RUN_POINT });
    await fg.line(/^READY$/);
    await waitFor(() => processState(fg.child.pid!) === 'T', 30_000, `run to stop at '${RUN_POINT}'`);
    let settled = false;
    const killed = api.kill('fghup', { home: sb.home, signal: 'HUP' }).finally(() => (settled = true));
    // A kill that does not wait for the supervisor signals every process
    // now, while `run` is stopped: given up to a second to, before `run`
    // goes on (a kill that waits, as it must, cannot end before that).
    await waitFor(() => settled, 1_000).catch(() => undefined);
    fg.child.kill('SIGCONT');
    await killed;
    writeFileSync(go, '');
    expect((await fg.line(/^CHILD-ENDED \d+$/))[0]).toBe('CHILD-ENDED 143');
    const r = await fg.exited;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).not.toMatch(/warning/);
    expect(sb.run(['rm', 'fghup']).code).toBe(0);
  });

  /** `appshot run -d` of a shell `script` ($0: `marker`, a path) stopped
   * at RUN_POINT, its application running and having said READY; then
   * `appshot ARGS` stopped at WAIT_POINT, having read it as running. */
  async function unsupervised(aid: string, script: string, marker: string, args: string[]) {
    const run = await stoppedAt(sb, ['run', '-d', '--aid', aid, '--', 'sh', '-c', `echo READY; ${script}`, marker], RUN_POINT, `run ${aid} to stop at '${RUN_POINT}'`);
    const log = join(sb.home, 'apps', aid, 'log');
    await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').includes('READY'), 30_000, `${aid} to say READY`);
    const command = await stoppedAt(sb, args, WAIT_POINT, `appshot ${args.join(' ')} to stop at '${WAIT_POINT}'`);
    return { run, command };
  }

  // The application ends by itself once its file is there, with code 5.
  const ENDS = 'while [ ! -e "$0" ]; do sleep 0.02; done; exit 5';
  const exitFile = (aid: string) => join(sb.home, 'apps', aid, 'exit');

  it('ended meanwhile: stop says it as ended, rm -f removes it, kill refuses it as an ended one', async () => {
    const cases = [
      { aid: 'mstop', args: ['stop', '--json', 'mstop'] },
      { aid: 'mkill', args: ['kill', '-s', 'HUP', 'mkill'] },
      { aid: 'mrm', args: ['rm', '-f', 'mrm'] },
    ];
    const results: Record<string, { code: number | null; stdout: string; stderr: string }> = {};
    for (const { aid, args } of cases) {
      const marker = join(dir, `${aid}.end`);
      const { run, command } = await unsupervised(aid, ENDS, marker, args);
      writeFileSync(marker, '');
      await waitFor(() => existsSync(exitFile(aid)), 30_000, `${aid} to end`);
      results[aid] = await command.go();
      expect(results[aid].stderr, aid).not.toMatch(/warning/);
      expect((await run.go()).code, `run -d ${aid}`).toBe(0);
    }
    // As stop says an end after its signal: its AID and exit code, exit 0.
    expect(results.mstop.code, results.mstop.stderr).toBe(0);
    expect(JSON.parse(results.mstop.stdout)).toMatchObject([{ aid: 'mstop', exitCode: 5 }]);
    expect(app('mstop')).toMatchObject({ state: 'exited', exitCode: 5 });
    // As kill refuses one that ended before it: exit 1, how it ended.
    expect(results.mkill.code).toBe(1);
    expect(results.mkill.stderr).toMatch(/^appshot: 'mkill' is not running \(exited with code 5 at /);
    expect(app('mkill')).toMatchObject({ state: 'exited', exitCode: 5 });
    expect(results.mrm.code, results.mrm.stderr).toBe(0);
    expect(results.mrm.stdout).toBe('mrm\n');
    expect(sb.allAids()).not.toContain('mrm');
    for (const aid of ['mstop', 'mkill']) expect(sb.run(['rm', aid]).code).toBe(0);
  });

  it('released meanwhile (its run, init and processes killed): stop and rm -f say it, kill refuses it with exit 1', async () => {
    const cases = [
      { aid: 'rstop', args: ['stop', 'rstop'] },
      { aid: 'rkill', args: ['kill', 'rkill'] },
      { aid: 'rrm', args: ['rm', '-f', 'rrm'] },
    ];
    const results: Record<string, { code: number | null; stdout: string; stderr: string }> = {};
    for (const { aid, args } of cases) {
      // The shell waits in the open of a FIFO nobody writes: no process
      // of its own (a `sleep` might outlive the others for a moment).
      const marker = join(dir, `${aid}.fifo`);
      expect(spawnSync('mkfifo', [marker]).status).toBe(0);
      const { command } = await unsupervised(aid, 'read x < "$0"', marker, args);
      // `run`, init and the shell all name the FIFO: killed together,
      // nobody writes how it ended, and nothing of it is left.
      const pids = processesWithArgument(marker);
      expect(pids.length, aid).toBeGreaterThanOrEqual(3);
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      await waitFor(() => !pids.some(alive), 30_000, `${aid}'s processes to be gone`);
      results[aid] = await command.go();
    }
    expect(results.rstop.code, results.rstop.stderr).toBe(0);
    expect(results.rstop.stdout).toBe('rstop\n');
    expect(results.rkill.code).toBe(1);
    expect(results.rkill.stderr).toBe("appshot: 'rkill' is not running: it ended before its appshot run recorded its supervisor, and its registration went with it\n");
    expect(results.rrm.code, results.rrm.stderr).toBe(0);
    expect(results.rrm.stdout).toBe('rrm\n');
    for (const aid of ['rstop', 'rkill', 'rrm']) expect(sb.allAids()).not.toContain(aid);
  });

  it('its run gone before recording it: kill says, in one line, that it signals the processes directly', async () => {
    const marker = join(dir, 'orphan.fifo');
    expect(spawnSync('mkfifo', [marker]).status).toBe(0);
    const run = await stoppedAt(sb, ['run', '-d', '--aid', 'orphan', '--', 'sh', '-c', 'echo READY; read x < "$0"', marker], RUN_POINT, `run to stop at '${RUN_POINT}'`);
    const log = join(sb.home, 'apps', 'orphan', 'log');
    await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').includes('READY'), 30_000, 'orphan to say READY');
    // Only `run` killed: init and the shell go on, and no supervisor will
    // ever be on record.
    const runPid = processesWithArgument(marker).find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('run'));
    expect(runPid).toBeDefined();
    process.kill(runPid!, 'SIGKILL');
    await run.go();
    const k = await sb.runAsync(['kill', 'orphan']);
    expect(k.code, k.stderr).toBe(0);
    expect(k.stderr).toBe("appshot: warning: 'orphan' has no supervisor on record (the appshot run that started it ended before recording it): its processes are signalled directly\n");
    await waitFor(() => processesWithArgument(marker).length === 0, 30_000, "orphan's processes to be gone");
    expect(sb.run(['rm', '-f', 'orphan']).code).toBe(0);
    expect(sb.allAids()).not.toContain('orphan');
  });

  it('its run gone before recording it: snapshot and kill read its record once more and stop waiting (APPSHOT_DEBUG counts the reads)', async () => {
    // The wait for the supervisor ends at once when the `run` that
    // registered the application is gone (review r422 F1; r436 A4: the
    // test above passes after a 10-s wait too). Shown by what the wait
    // did, not how long it took: the record read again once and the wait
    // stopped because that run is gone. A wait to its deadline reads it
    // again every 50 ms at most and says "none was recorded within".
    const marker = join(dir, 'gone.fifo');
    expect(spawnSync('mkfifo', [marker]).status).toBe(0);
    const run = await stoppedAt(sb, ['run', '-d', '--aid', 'gone', '--', 'sh', '-c', 'echo READY; read x < "$0"', marker], RUN_POINT, `run to stop at '${RUN_POINT}'`);
    const log = join(sb.home, 'apps', 'gone', 'log');
    await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').includes('READY'), 30_000, 'gone to say READY');
    const runPid = processesWithArgument(marker).find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('run'));
    expect(runPid).toBeDefined();
    process.kill(runPid!, 'SIGKILL');
    // Reaped once go() returns: no process of that PID and start time.
    await run.go();
    const env = { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_DEBUG: '1' };
    const waited = (stderr: string) => stderr.split('\n').filter((l) => l.includes("no supervisor in the registration's record"));
    const once = "appshot: 'gone': no supervisor in the registration's record after reading it again 1 time: the appshot run that registered it is gone";
    // snapshot refuses it (README: "'A' is not running", exit 3) and
    // leaves it running.
    const s = await spawnAsync(command, ['snapshot', 'gone', '-o', join(dir, 'gone.appshot')], { env });
    expect(s.status, s.stderr).toBe(3);
    expect(s.stderr.split('\n')).toContain("appshot: 'gone' is not running");
    expect(waited(s.stderr)).toEqual([once]);
    expect(processesWithArgument(marker).length, 'init and the shell').toBeGreaterThanOrEqual(2);
    // kill signals its processes directly, with the warning.
    const k = await spawnAsync(command, ['kill', 'gone'], { env });
    expect(k.status, k.stderr).toBe(0);
    expect(k.stderr).toBe(`${once}\nappshot: warning: 'gone' has no supervisor on record (the appshot run that started it ended before recording it): its processes are signalled directly\n`);
    await waitFor(() => processesWithArgument(marker).length === 0, 30_000, "gone's processes to be gone");
    expect(sb.run(['rm', '-f', 'gone']).code).toBe(0);
    expect(sb.allAids()).not.toContain('gone');
  });

  it('a run that fails once its application runs, before recording its supervisor, ends every process of it and leaves nothing registered', async () => {
    // Stopped at the point first, and made to fail there once continued
    // (killPoint: STOP_AT, then FAIL_AT): the application runs by then,
    // with a child and a daemon that left its parent (init's, as their
    // subreaper). Each waits in the open of a FIFO nobody writes, naming
    // it: so do `run` and init.
    const marker = join(dir, 'failspawn.fifo');
    expect(spawnSync('mkfifo', [marker]).status).toBe(0);
    const script = 'sh -c \'read x < "$0"\' "$0" & ( sh -c \'read x < "$0"\' "$0" & ); echo READY; read x < "$0"';
    try {
      const run = await stoppedAt(sb, ['run', '-d', '--aid', 'failspawn', '--', 'sh', '-c', script, marker], RUN_POINT, `run to stop at '${RUN_POINT}'`, {
        APPSHOT_TEST_FAIL_AT: RUN_POINT,
      });
      const log = join(sb.home, 'apps', 'failspawn', 'log');
      await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').includes('READY'), 30_000, 'failspawn to say READY');
      // run, init, the shell, its child and the daemon.
      await waitFor(() => processesWithArgument(marker).length >= 5, 30_000, "failspawn's processes to start");
      const pids = processesWithArgument(marker);
      const r = await run.go();
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain("failure injected at 'run: init spawned' (APPSHOT_TEST_FAIL_AT)");
      expect(r.stderr).not.toMatch(/kept/);
      // Gone by the time `run` has exited, not some time later.
      expect(pids.filter(alive)).toEqual([]);
      expect(processesWithArgument(marker).filter(alive)).toEqual([]);
      expect(sb.allAids()).not.toContain('failspawn');
      expect(tableFilesOf('failspawn')).toEqual([]);
      expect(existsSync(join(sb.home, 'apps', 'failspawn'))).toBe(false);
      // Not stopped, in the foreground: the failure comes while init may
      // still be launching the command, or just after. Either way nothing
      // of it is left once `run` has exited.
      const f = spawnSync(command, ['run', '--aid', 'failspawn', '--', 'sh', '-c', script, marker], {
        env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: RUN_POINT },
        encoding: 'utf8',
        timeout: 50_000,
      });
      expect(f.status).not.toBe(0);
      expect(f.stderr).toContain("failure injected at 'run: init spawned' (APPSHOT_TEST_FAIL_AT)");
      expect(processesWithArgument(marker).filter(alive)).toEqual([]);
      expect(sb.allAids()).not.toContain('failspawn');
      expect(tableFilesOf('failspawn')).toEqual([]);
    } finally {
      for (const pid of processesWithArgument(marker)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
  });

  it('its AID registered again meanwhile: kill, stop and rm -f refuse in one line and leave the new application as it is', async () => {
    // The command read one application, waited for its supervisor, and
    // found another under the AID: its registration released (run, init
    // and shell killed) and a new `run -d --aid` of the same name made
    // while the command was stopped at its point, having read the first
    // (review r436 A5: the new one was signalled, stopped or removed).
    for (const [i, args] of [['kill', '-s', 'TERM'], ['stop'], ['rm', '-f']].entries()) {
      const aid = `again${i}`;
      const first = join(dir, `${aid}.first.fifo`);
      const second = join(dir, `${aid}.second.fifo`);
      for (const f of [first, second]) expect(spawnSync('mkfifo', [f]).status).toBe(0);
      const { command } = await unsupervised(aid, 'read x < "$0"', first, [...args, aid]);
      const pids = processesWithArgument(first);
      expect(pids.length, aid).toBeGreaterThanOrEqual(3);
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      await waitFor(() => !pids.some(alive), 30_000, `${aid}'s first processes to be gone`);
      const again = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'read x < "$0"', second]);
      expect(again.code, again.stderr).toBe(0);
      const running = processesWithArgument(second);
      expect(running.length, `${aid}'s second init and shell`).toBeGreaterThanOrEqual(2);
      const r = await command.go();
      expect(r.code, r.stderr).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(
        `appshot: '${aid}' went while this command waited for its supervisor, and another application has been registered as '${aid}' since: that one was left as it is (run the command again to act on it)\n`,
      );
      // Not signalled (its shell has no TERM handler), not removed.
      expect(running.filter(alive)).toEqual(running);
      expect(app(aid)).toMatchObject({ state: 'running' });
      expect(sb.run(['rm', '-f', aid]).code).toBe(0);
      await waitFor(() => !running.some(alive), 30_000, `${aid}'s second processes to be gone`);
    }
  });

  it('its AID registered again while a snapshot waits: the snapshot refuses in one line and leaves the new application running', async () => {
    // As above, for snapshot, which reads the record itself and would end
    // the application it snapshots: stopped in its wait (at
    // LOOP_POINT, before a read), the registration replaced meanwhile.
    const LOOP_POINT = 'supervisor: reading the record again';
    const aid = 'againsnap';
    const first = join(dir, `${aid}.first.fifo`);
    const second = join(dir, `${aid}.second.fifo`);
    for (const f of [first, second]) expect(spawnSync('mkfifo', [f]).status).toBe(0);
    await stoppedAt(sb, ['run', '-d', '--aid', aid, '--', 'sh', '-c', 'echo READY; read x < "$0"', first], RUN_POINT, `run ${aid} to stop at '${RUN_POINT}'`);
    const log = join(sb.home, 'apps', aid, 'log');
    await waitFor(() => existsSync(log) && readFileSync(log, 'utf8').includes('READY'), 30_000, `${aid} to say READY`);
    const image = join(dir, `${aid}.appshot`);
    const snapshot = await stoppedAt(sb, ['snapshot', aid, '-o', image], LOOP_POINT, `snapshot to stop at '${LOOP_POINT}'`);
    const pids = processesWithArgument(first);
    expect(pids.length).toBeGreaterThanOrEqual(3);
    for (const pid of pids) process.kill(pid, 'SIGKILL');
    await waitFor(() => !pids.some(alive), 30_000, `${aid}'s first processes to be gone`);
    const again = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'read x < "$0"', second]);
    expect(again.code, again.stderr).toBe(0);
    const running = processesWithArgument(second);
    expect(running.length, 'the second init and shell').toBeGreaterThanOrEqual(2);
    const r = await snapshot.go();
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toBe(
      `appshot: '${aid}' went while this command waited for its supervisor, and another application has been registered as '${aid}' since: that one was left as it is (run the command again to act on it)\n`,
    );
    expect(existsSync(image)).toBe(false);
    expect(running.filter(alive)).toEqual(running);
    expect(app(aid)).toMatchObject({ state: 'running' });
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
    await waitFor(() => !running.some(alive), 30_000, `${aid}'s second processes to be gone`);
  });

  it('snapshotted meanwhile: rm -f removes the record the snapshot left', async () => {
    const marker = join(dir, 'msnap.never');
    const { run, command } = await unsupervised('msnap', ENDS, marker, ['rm', '-f', 'msnap']);
    // `run` records the supervisor and returns; the snapshot ends it while
    // rm -f still holds the record it read.
    expect((await run.go()).code).toBe(0);
    const image = join(dir, 'msnap.appshot');
    const s = sb.run(['snapshot', 'msnap', '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    expect(app('msnap')).toMatchObject({ state: 'snapshotted', image });
    const r = await command.go();
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('msnap\n');
    expect(app('msnap')).toBeUndefined();
  });
});

describe('rm of a clone', () => {
  const ROOT = join(dir, 'srv');
  // Ports of their own (the map: helpers.ts, Sandbox).
  const base = 23800 + ((process.pid * 7) % 100) * 2;
  const PORT_ALLOC = base;
  const PORT_MUX = base + 1;

  it('removes its private copies, REDIR PATH directories and port claims', async () => {
    await templfixTemplate(sb, { root: ROOT, rules: join(dir, 'templfix.rules'), portAlloc: PORT_ALLOC, portMux: PORT_MUX }, 'tsrc', join(dir, 'tsnap'), join(dir, 'tpl'));
    // The snapshot's source is kept as snapshotted: a clone is not the
    // restore of its image, and may not take its AID.
    const taken = sb.run(['clone', join(dir, 'tpl'), '--aid', 'tsrc']);
    expect(taken.code, taken.stderr).toBe(4);
    expect(taken.stderr).toContain(`AID 'tsrc' is in use by an application that was snapshotted to ${join(dir, 'tsnap')} at ${app('tsrc')!.snapshottedAt}: restore the image, or 'appshot rm tsrc' removes its record\n`);
    expect(sb.allAids()).not.toContain('tsrc');
    expect(sb.run(['rm', 'tsrc']).code).toBe(0);
    const c = sb.run(['clone', join(dir, 'tpl'), '--aid', 'cl', '--count', '2', '--json']);
    expect(c.code, c.stderr).toBe(0);
    const clones = JSON.parse(c.stdout) as { aid: string; privateRoot: string; ports: { virtual: number; system: number }[] }[];
    const claims = () => (existsSync(join(sb.home, 'ports')) ? readdirSync(join(sb.home, 'ports')).filter((p) => /^\d+$/.test(p)) : []);
    for (const x of clones) {
      const own = x.ports.find((p) => p.virtual === PORT_ALLOC)!.system;
      // A write: into its private copy and its redirected config directory.
      expect((await tcpExchange(own, 'SET mine\n')).trim()).toBe('OK');
      expect(existsSync(x.privateRoot)).toBe(true);
      expect(existsSync(join(ROOT, 'instances', x.aid, 'config'))).toBe(true);
      expect(claims()).toContain(String(own));
    }
    const listed = sb.run(['ps']).stdout;
    expect(listed).toMatch(new RegExp(`^cl-1\\s+running\\s+\\d+[sm]\\s+\\d+\\s+${join(dir, 'tpl')} #1\\s+${PORT_ALLOC}->\\d+, ${PORT_MUX} \\(shared\\)`, 'm'));
    const [one, two] = clones;
    // The batch's commit file, one for both: kept while either is registered.
    const commitOf = (aid: string): string => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).restore.commitPath;
    const commit = commitOf(one.aid);
    expect(commitOf(two.aid)).toBe(commit);
    expect(existsSync(commit)).toBe(true);
    const onePort = String(one.ports.find((p) => p.virtual === PORT_ALLOC)!.system);
    // Ended, it holds no port; its copies stay until rm.
    expect(sb.run(['stop', one.aid]).code).toBe(0);
    expect(sb.run(['ps', '-a']).code).toBe(0);
    expect(claims()).not.toContain(onePort);
    expect(app(one.aid)).toMatchObject({ state: 'exited', ports: [] });
    expect(existsSync(one.privateRoot)).toBe(true);
    expect(sb.run(['rm', one.aid]).code).toBe(0);
    expect(existsSync(commit)).toBe(true);
    // rm -f of the running one: the same, killed first; and with the last
    // of the batch, its commit file.
    expect(sb.run(['rm', '-f', two.aid]).code).toBe(0);
    expect(existsSync(commit)).toBe(false);
    for (const x of clones) {
      expect(existsSync(x.privateRoot)).toBe(false);
      expect(existsSync(join(ROOT, 'instances', x.aid))).toBe(false);
      expect(sb.allAids()).not.toContain(x.aid);
      expect(tableFilesOf(x.aid)).toEqual([]);
    }
    expect(claims()).toEqual([]);
  });

  it('leaves a REDIR PATH directory the clones of its batch share until the last of them is removed', async () => {
    // A target naming no per-instance property: one directory for the
    // batch, made by the first clone. Its rm took the others' data
    // (fuzz33 M6).
    const from = join(dir, 'shared-from');
    const to = join(dir, 'shared-to', 'data');
    mkdirSync(from);
    writeFileSync(join(dir, 'shared.rules'), `REDIR PATH "${from}" TO "${to}"\n`);
    sb.ok(['run', '-d', '--aid', 'shsrc', '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    sb.ok(['snapshot', 'shsrc', '-o', join(dir, 'shsnap')]);
    sb.ok(['template', 'create', join(dir, 'shsnap'), '-o', join(dir, 'shtpl'), '--rules', join(dir, 'shared.rules')]);
    expect(existsSync(to)).toBe(false);
    const clones = sb.json<{ aid: string }[]>(['clone', join(dir, 'shtpl'), '--aid', 'sh', '--count', '2']);
    expect(clones.map((c) => c.aid)).toEqual(['sh-1', 'sh-2']);
    writeFileSync(join(to, 'data-of-sh-2'), 'kept\n');
    // Those of directories kept for others, not for an image (kept-*: the
    // template source's, whose snapshot's record went before).
    const marks = () => (existsSync(join(sb.home, 'redirs')) ? readdirSync(join(sb.home, 'redirs')).filter((m) => !m.startsWith('.') && !m.startsWith('kept-')) : []);
    expect(sb.run(['rm', '-f', 'sh-1']).code).toBe(0);
    expect(readFileSync(join(to, 'data-of-sh-2'), 'utf8')).toBe('kept\n');
    expect(marks()).toHaveLength(1);
    // Its rm, the last of the batch's, removes it, and the mark.
    expect(sb.run(['rm', '-f', 'sh-2']).code).toBe(0);
    expect(existsSync(join(dir, 'shared-to'))).toBe(false);
    expect(marks()).toEqual([]);

    // Its maker's restore killed before its commit, after another clone
    // came to lead into it: what the maker's end removes is the same
    // decision (its first version removed it regardless: review34 #1).
    const killed = spawn(process.execPath, [cli, 'clone', join(dir, 'shtpl'), '--aid', 'shk'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: 'restore: global state' }, stdio: 'ignore' });
    try {
      await waitFor(() => readFileSync(`/proc/${killed.pid}/stat`, 'utf8').split(') ')[1]?.startsWith('T') ?? false, 30_000, 'the clone to stop itself before its commit');
      expect(existsSync(to)).toBe(true);
      sb.ok(['clone', join(dir, 'shtpl'), '--aid', 'shu']);
      writeFileSync(join(to, 'data-of-shu'), 'kept\n');
    } finally {
      killed.kill('SIGKILL');
    }
    await waitFor(() => killed.exitCode !== null || killed.signalCode !== null, 10_000, 'the stopped clone to die');
    // Any command settles the killed restore: its registration goes.
    await waitFor(() => !sb.run(['ps', '-a', '-q']).stdout.split('\n').includes('shk'), 30_000, 'the killed clone to be released');
    expect(readFileSync(join(to, 'data-of-shu'), 'utf8')).toBe('kept\n');
    expect(sb.run(['rm', '-f', 'shu']).code).toBe(0);
    expect(existsSync(join(dir, 'shared-to'))).toBe(false);
    expect(marks()).toEqual([]);
    sb.run(['rm', 'shsrc']);
  });

  it('whose init was killed with it (SIGKILL): kept as lost, without exit code, until rm removes its private copies and REDIR PATH directories', async () => {
    if (!existsSync(join(dir, 'tpl'))) await templfixTemplate(sb, { root: ROOT, rules: join(dir, 'templfix.rules'), portAlloc: PORT_ALLOC, portMux: PORT_MUX }, 'tsrc', join(dir, 'tsnap'), join(dir, 'tpl'));
    const c = sb.run(['clone', join(dir, 'tpl'), '--aid', 'lost', '--json']);
    expect(c.code, c.stderr).toBe(0);
    const [x] = JSON.parse(c.stdout) as { aid: string; privateRoot: string; ports: { virtual: number; system: number }[] }[];
    expect((await tcpExchange(x.ports.find((p) => p.virtual === PORT_ALLOC)!.system, 'SET mine\n')).trim()).toBe('OK');
    const redir = join(ROOT, 'instances', x.aid);
    expect(existsSync(redir)).toBe(true);
    // Every process at once, its init among them: nobody writes how it ended.
    const procs = app(x.aid)!.processes;
    expect(procs.some((p) => p.init)).toBe(true);
    for (const p of procs) process.kill(p.pid, 'SIGKILL');
    await waitFor(() => procs.every((p) => !alive(p.pid)), 30_000, 'the clone and its init to die');
    await waitFor(() => app(x.aid)?.state === 'exited', 30_000, 'the clone to be found ended');
    const lost = app(x.aid)!;
    expect(lost).toMatchObject({ state: 'exited', lost: true, processes: [], ports: [] });
    expect(lost.exitCode).toBeUndefined();
    expect(sb.run(['ps', '-a']).stdout).toMatch(new RegExp(`^${x.aid}\\s+exited \\(lost\\)`, 'm'));
    const w = sb.run(['wait', x.aid]);
    expect(w.code).toBe(1);
    expect(w.stdout).toBe('');
    expect(w.stderr).toMatch(new RegExp(`^appshot: '${x.aid}' was lost: its init was killed, no exit code; found ended at \\S+\\n$`));
    // Its data is there for rm to name, and only rm removes it.
    expect(existsSync(x.privateRoot)).toBe(true);
    expect(existsSync(redir)).toBe(true);
    expect(tableFilesOf(x.aid)).toEqual([]);
    const taken = sb.run(['run', '--aid', x.aid, '--', 'true']);
    expect(taken.code).toBe(4);
    expect(sb.run(['rm', x.aid]).code).toBe(0);
    expect(existsSync(x.privateRoot)).toBe(false);
    expect(existsSync(redir)).toBe(false);
    expect(sb.allAids()).not.toContain(x.aid);
  });
});

describe('rm of an application run with --rules', () => {
  /** Rules `name`.rules in `dir` redirecting a new directory `name`-from
   * to `dir`/`target`/<APPL-ID>. */
  const redirRules = (name: string, target = name) => {
    const from = join(dir, `${name}-from`);
    mkdirSync(from);
    const rules = join(dir, `${name}.rules`);
    writeFileSync(rules, `DEFINE <APPL-ID> AS PROPERTY application-id\nREDIR PATH "${from}" TO "${dir}/${target}/<APPL-ID>"\n`);
    return rules;
  };
  /** appshot run from /: a working directory under /tmp is refused with
   * --private-tmp. */
  const fromRoot = (args: string[]) => {
    const r = spawnSync(command, args, { env: sb.env, cwd: '/', encoding: 'utf8', timeout: 50_000 });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it('removes the REDIR PATH directories made for it; after a snapshot that ended it, keeps them for the image', () => {
    const rules = redirRules('runredir', 'runredir/inst');
    const loop = ['sh', '-c', 'while :; do sleep 0.1; done'];
    sb.ok(['run', '-d', '--aid', 'rr1', '--rules', rules, '--', ...loop]);
    expect(existsSync(join(dir, 'runredir', 'inst', 'rr1'))).toBe(true);
    sb.ok(['rm', '-f', 'rr1']);
    expect(existsSync(join(dir, 'runredir'))).toBe(false);
    // The files the application wrote there are not in its image: a
    // restore of it needs them, so the snapshot's record's rm keeps them.
    sb.ok(['run', '-d', '--aid', 'rr2', '--rules', rules, '--', ...loop]);
    writeFileSync(join(dir, 'runredir', 'inst', 'rr2', 'data'), 'kept\n');
    sb.ok(['snapshot', 'rr2', '-o', join(dir, 'rr2.appshot')]);
    const rm = sb.run(['rm', 'rr2']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe(`appshot: 'rr2': kept the REDIR PATH directories made for it, whose files its image ${join(dir, 'rr2.appshot')} needs and does not hold: ${join(dir, 'runredir', 'inst', 'rr2')} (rm -r them once that image is not to be restored)\n`);
    expect(readFileSync(join(dir, 'runredir', 'inst', 'rr2', 'data'), 'utf8')).toBe('kept\n');
  });

  it('keeps them for an image taken with --leave-running too: rm -f of the running application says so', () => {
    const rules = redirRules('leftredir');
    sb.ok(['run', '-d', '--aid', 'lr1', '--rules', rules, '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    const made = join(dir, 'leftredir', 'lr1');
    writeFileSync(join(made, 'data'), 'kept\n');
    const image = join(dir, 'lr1.appshot');
    sb.ok(['snapshot', 'lr1', '--leave-running', '-o', image]);
    // Removed with it, the file would be lost to the image's restore.
    const rm = sb.run(['rm', '-f', 'lr1']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout).toBe('lr1\n');
    expect(readFileSync(join(made, 'data'), 'utf8')).toBe('kept\n');
    expect(rm.stderr).toBe(`appshot: 'lr1': kept the REDIR PATH directories made for it, whose files its image ${image} needs and does not hold: ${made} (rm -r them once that image is not to be restored)\n`);
  });

  it('names the directories it keeps with control characters as escapes, after a --leave-running snapshot and after one that ended it', () => {
    // A target's name is the rules' (or an image's) word: an escape
    // sequence in it, written raw, would drive the terminal; a newline
    // (which an image may carry) would forge a line of its own.
    const rules = redirRules('escredir', `esc\x1b[31mred\tdir`);
    const loop = ['sh', '-c', 'while :; do sleep 0.1; done'];
    const shown = `${dir}/esc\\e[31mred\\tdir`;
    sb.ok(['run', '-d', '--aid', 'er1', '--rules', rules, '--', ...loop]);
    writeFileSync(join(dir, 'esc\x1b[31mred\tdir', 'er1', 'data'), 'kept\n');
    const image = join(dir, 'er1\x1b]0;title\x07.appshot');
    sb.ok(['snapshot', 'er1', '--leave-running', '-o', image]);
    const rm = sb.run(['rm', '-f', 'er1']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe(`appshot: 'er1': kept the REDIR PATH directories made for it, whose files its image ${dir}/er1\\e]0;title\\x07.appshot needs and does not hold: ${shown}/er1 (rm -r them once that image is not to be restored)\n`);
    expect(readFileSync(join(dir, 'esc\x1b[31mred\tdir', 'er1', 'data'), 'utf8')).toBe('kept\n');
    // The record of a snapshot that ended it: the same line (lifecycle.ts
    // removeSnapshotted).
    sb.ok(['run', '-d', '--aid', 'er2', '--rules', rules, '--', ...loop]);
    sb.ok(['snapshot', 'er2', '-o', join(dir, 'er2.appshot')]);
    const rm2 = sb.run(['rm', 'er2']);
    expect(rm2.code, rm2.stderr).toBe(0);
    expect(rm2.stderr).toBe(`appshot: 'er2': kept the REDIR PATH directories made for it, whose files its image ${join(dir, 'er2.appshot')} needs and does not hold: ${shown}/er2 (rm -r them once that image is not to be restored)\n`);
  });

  it('does not name as kept a directory in private copies that goes with the same rm (a private /tmp a restore made anew)', () => {
    const rules = redirRules('ptredir');
    const run = fromRoot(['run', '-d', '--aid', 'pt1', '--private-tmp', '--rules', rules, '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    expect(run.code, run.stderr).toBe(0);
    const root = app('pt1')!.privateRoot!;
    expect(existsSync(join(root, 'tmp'))).toBe(true);
    const made = join(dir, 'ptredir', 'pt1');
    sb.ok(['snapshot', 'pt1', '-o', join(dir, 'pt1.appshot')]);
    sb.ok(['rm', 'pt1']);
    // Restored where neither directory is (another node, as it were): the
    // restore makes both, its private /tmp in its private copies.
    rmSync(root, { recursive: true });
    rmSync(join(dir, 'ptredir'), { recursive: true });
    const restored = fromRoot(['restore', join(dir, 'pt1.appshot')]);
    expect(restored.code, restored.stderr).toBe(0);
    expect(existsSync(join(root, 'tmp'))).toBe(true);
    expect(existsSync(made)).toBe(true);
    const image = join(dir, 'pt1-left.appshot');
    sb.ok(['snapshot', 'pt1', '--leave-running', '-o', image]);
    // Its private copies go with it (after --leave-running, as a clone's):
    // the line names only what stays.
    const rm = sb.run(['rm', '-f', 'pt1']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(existsSync(root)).toBe(false);
    expect(existsSync(made)).toBe(true);
    expect(rm.stderr).toBe(`appshot: 'pt1': kept the REDIR PATH directories made for it, whose files its image ${image} needs and does not hold: ${made} (rm -r them once that image is not to be restored)\n`);
  });

  it('says what it kept for an image though the private copies that go with it cannot all be removed', () => {
    const rules = redirRules('ptbusy');
    const run = fromRoot(['run', '-d', '--aid', 'pb1', '--private-tmp', '--rules', rules, '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    expect(run.code, run.stderr).toBe(0);
    const root = app('pb1')!.privateRoot!;
    const made = join(dir, 'ptbusy', 'pb1');
    const image = join(dir, 'pb1.appshot');
    sb.ok(['snapshot', 'pb1', '--leave-running', '-o', image]);
    // A directory in its private /tmp that cannot be removed (EPERM):
    // the removal of its private copies throws.
    const stuck = join(root, 'tmp', 'stuck');
    mkdirSync(stuck);
    const chattr = (flag: string) => expect(spawnSync('chattr', [flag, stuck]).status).toBe(0);
    chattr('+i');
    try {
      const rm = sb.run(['rm', '-f', 'pb1']);
      expect(rm.code).not.toBe(0);
      const lines = rm.stderr.split('\n');
      expect(lines[0]).toBe(`appshot: 'pb1': kept the REDIR PATH directories made for it, whose files its image ${image} needs and does not hold: ${made} (rm -r them once that image is not to be restored)`);
      expect(lines[1]).toMatch(/^appshot: cannot remove 'pb1': .*EPERM/);
      expect(existsSync(made)).toBe(true);
    } finally {
      chattr('-i');
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('a --leave-running snapshot whose registration cannot record its image stands, with a warning saying what that costs', () => {
    const rules = redirRules('unrec');
    sb.ok(['run', '-d', '--aid', 'ur1', '--rules', rules, '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    const image = join(dir, 'ur1.appshot');
    // The registration's write fails, past the image's commit (in this
    // process: an engine's environment is not the command's).
    const r = spawnSync(command, ['snapshot', 'ur1', '--leave-running', '-o', image], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: recording the image' },
      encoding: 'utf8',
      timeout: 50_000,
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${image}\n`);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/; still running$/);
    expect(lines[1]).toBe(
      `appshot: warning: the image ${image} is whole, but the registration of 'ur1' could not record it (failure injected at 'snapshot: recording the image' (APPSHOT_TEST_FAIL_AT)): ` +
        'its next snapshot will be whole, not incremental on this image; its rm will remove the REDIR PATH directories made for it, whose files this image needs and does not hold (copy them first, to restore it)',
    );
    // Kept whole, of an application that runs on.
    expect(sb.run(['inspect', image]).code).toBe(0);
    expect(app('ur1')?.state).toBe('running');
    // As it said: nothing recorded of the image, so rm takes the directory
    // (and says nothing kept).
    const recorded = JSON.parse(readFileSync(join(sb.home, 'apps', 'ur1', 'app.json'), 'utf8'));
    expect(recorded.imagedTo).toBeUndefined();
    expect(recorded.lastImage).toBeUndefined();
    const rm = sb.run(['rm', '-f', 'ur1']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe('');
    expect(existsSync(join(dir, 'unrec', 'ur1'))).toBe(false);
  });

  it('a --leave-running snapshot whose registration cannot record its image, after one that could: the directories stay, for the earlier image', () => {
    const rules = redirRules('unrec2');
    sb.ok(['run', '-d', '--aid', 'ur2', '--rules', rules, '--', 'sh', '-c', 'while :; do sleep 0.1; done']);
    const made = join(dir, 'unrec2', 'ur2');
    writeFileSync(join(made, 'data'), 'kept\n');
    const first = join(dir, 'ur2-first.appshot');
    sb.ok(['snapshot', 'ur2', '--leave-running', '-o', first]);
    const image = join(dir, 'ur2.appshot');
    const r = spawnSync(command, ['snapshot', 'ur2', '--leave-running', '-o', image], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: recording the image' },
      encoding: 'utf8',
      timeout: 50_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[1]).toMatch(new RegExp(`^appshot: warning: the image ${image} is whole, but the registration of 'ur2' could not record it \\(`));
    // Not the removal that a first image's failed record costs.
    expect(lines[1]).not.toContain('will remove');
    expect(lines[1].endsWith(`its rm will keep the REDIR PATH directories made for it, which this image needs, but name as their image the earlier ${first}`)).toBe(true);
    const rm = sb.run(['rm', '-f', 'ur2']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe(`appshot: 'ur2': kept the REDIR PATH directories made for it, whose files its image ${first} needs and does not hold: ${made} (rm -r them once that image is not to be restored)\n`);
    expect(readFileSync(join(made, 'data'), 'utf8')).toBe('kept\n');
  });

  // Review r345: a directory kept for an image, made inside another's
  // (its rules' target in the other's), went with that other's directory
  // once neither registration led into it any more, after rm had said it
  // was kept. Each of the three ways there: both removed by one rm, the
  // other's rm first (its directory left for the imaged one's use), and
  // the record of a snapshot that ended the imaged one.
  /** Two applications run with rules whose targets nest: `${name}c` makes
   * `outer`, then `${name}a` makes `inner` in it and writes a file there. */
  const nestedRedirs = (name: string) => {
    const fromOuter = join(dir, `${name}-from-outer`);
    const fromInner = join(dir, `${name}-from-inner`);
    mkdirSync(fromOuter);
    mkdirSync(fromInner);
    const top = join(dir, `${name}-d`);
    const outer = join(top, 'x');
    const inner = join(outer, 'sub');
    writeFileSync(join(dir, `${name}-outer.rules`), `REDIR PATH "${fromOuter}" TO "${outer}"\n`);
    writeFileSync(join(dir, `${name}-inner.rules`), `REDIR PATH "${fromInner}" TO "${inner}"\n`);
    const loop = ['sh', '-c', 'while :; do sleep 0.1; done'];
    sb.ok(['run', '-d', '--aid', `${name}c`, '--rules', join(dir, `${name}-outer.rules`), '--', ...loop]);
    expect(existsSync(outer)).toBe(true);
    sb.ok(['run', '-d', '--aid', `${name}a`, '--rules', join(dir, `${name}-inner.rules`), '--', ...loop]);
    writeFileSync(join(inner, 'data'), 'kept\n');
    return { top, inner, image: join(dir, `${name}a.appshot`) };
  };
  const keptLine = (aid: string, image: string, inner: string) =>
    `appshot: '${aid}': kept the REDIR PATH directories made for it, whose files its image ${image} needs and does not hold: ${inner} (rm -r them once that image is not to be restored)\n`;
  /** The kept directory stays through later removals (a prune looks at
   * every directory kept for others), until the user removes it: then the
   * other's directory around it goes at the next. */
  const keptUntilRemoved = (top: string, inner: string) => {
    sb.ok(['prune']);
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    rmSync(inner, { recursive: true });
    sb.ok(['prune']);
    expect(existsSync(top)).toBe(false);
  };

  it('keeps a directory kept for an image inside the directory of another removed by the same rm', () => {
    const { top, inner, image } = nestedRedirs('nsa');
    sb.ok(['snapshot', 'nsaa', '--leave-running', '-o', image]);
    const rm = sb.run(['rm', '-f', 'nsac', 'nsaa']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout).toBe('nsac\nnsaa\n');
    expect(rm.stderr).toBe(keptLine('nsaa', image, inner));
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    keptUntilRemoved(top, inner);
  });

  it('keeps a directory kept for an image inside the directory of another removed before', () => {
    const { top, inner, image } = nestedRedirs('nsb');
    sb.ok(['snapshot', 'nsba', '--leave-running', '-o', image]);
    // Left, as the imaged one leads into it.
    sb.ok(['rm', '-f', 'nsbc']);
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    const rm = sb.run(['rm', '-f', 'nsba']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe(keptLine('nsba', image, inner));
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    keptUntilRemoved(top, inner);
  });

  it('keeps a directory kept for the image of a snapshot that ended it inside the directory of another removed before', () => {
    const { top, inner, image } = nestedRedirs('nsc');
    sb.ok(['snapshot', 'nsca', '-o', image]);
    sb.ok(['rm', '-f', 'nscc']);
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    const rm = sb.run(['rm', 'nsca']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stderr).toBe(keptLine('nsca', image, inner));
    expect(readFileSync(join(inner, 'data'), 'utf8')).toBe('kept\n');
    keptUntilRemoved(top, inner);
  });
});

describe('run --rules with a REDIR PATH target that cannot be made', () => {
  it('says which in one line and leaves none of the directories made for the targets before it', () => {
    const from = join(dir, 'unmakeable-from');
    mkdirSync(from);
    writeFileSync(join(dir, 'a-file'), '');
    const first = join(dir, 'made-first');
    writeFileSync(join(dir, 'unmakeable.rules'), `REDIR PATH "${from}/a" TO "${first}/a/x"\nREDIR PATH "${from}/b" TO "${dir}/a-file/y/z"\n`);
    const r = sb.run(['run', '--aid', 'unmakeable', '--rules', join(dir, 'unmakeable.rules'), '--', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`appshot: cannot make the directory of REDIR PATH target ${dir}/a-file/y/z: mkdir ${dir}/a-file/y: not a directory (ENOTDIR)\n`);
    expect(existsSync(first)).toBe(false);
    expect(sb.allAids()).not.toContain('unmakeable');
  });
});
