/** Starting the resident engine as a process of its own, detached from
 * the terminal and the command that starts it. */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const entry = join(dirname(fileURLToPath(import.meta.url)), 'main.js');

function spawnEngine(home: string, stderr: 'ignore' | 'pipe', onDemand = false) {
  // Its own session (detached): the terminal's Ctrl-C and hang-up are not
  // its. APPSHOT_HOME pinned: the engine serves this directory only.
  // As small a young generation as serve -d's (commands/serve.ts).
  // --expose-gc: a snapshot empties that young generation before it
  // freezes the application (driver.ts, collectBeforeFreeze), so that no
  // collection falls in its frozen window. --no-lazy: every function
  // compiled as its module loads, at the engine's start (it loads the
  // commands' modules then: server.ts), not in a command's first run
  // (cli.ts, compileEagerly, says what that saves).
  return spawn(process.execPath, ['--max-semi-space-size=1', '--expose-gc', '--no-lazy', entry, ...(onDemand ? ['--on-demand'] : [])], {
    detached: true,
    stdio: ['ignore', 'ignore', stderr],
    // One malloc arena for all its threads, as `serve -d` has
    // (commands/serve.ts residentEnv), unless set: it may host a serve,
    // whose work in bursts otherwise leaves freed memory resident in
    // per-thread arenas (bench/serve.js (e), 100 suspended services:
    // the engine hosting them 35-40 MiB of PSS without, 28-32 with, as
    // much as serve in its own process).
    env: { MALLOC_ARENA_MAX: '1', ...process.env, APPSHOT_HOME: home },
  });
}

/** APPSHOT_ENGINE=auto: an engine for the next commands, not waited for.
 * If another command starts one at the same moment, one of the two finds
 * the lock taken and leaves quietly. */
export function startEngineInBackground(home: string): void {
  try {
    spawnEngine(home, 'ignore', true).unref();
  } catch {
    /* the command runs here anyway */
  }
}

/** `appshot engine start`: starts one and waits until it listens (true),
 * or until it leaves (false, with what it said on stderr). */
export function startEngine(home: string, ready: () => Promise<boolean>): Promise<{ ok: boolean; said: string }> {
  const child = spawnEngine(home, 'pipe');
  let said = '';
  child.stderr!.on('data', (d: Buffer) => (said += d.toString()));
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearInterval(poll);
      child.stderr!.destroy();
      child.unref();
      resolve({ ok, said: said.trim() });
    };
    child.once('exit', () => settle(false));
    child.once('error', (e) => {
      said += e.message;
      settle(false);
    });
    const started = Date.now();
    const poll = setInterval(async () => {
      if (await ready()) settle(true);
      else if (Date.now() - started > 10_000) {
        said += `no answer on its socket after 10 s (pid ${child.pid})`;
        settle(false);
      }
    }, 20);
  });
}
