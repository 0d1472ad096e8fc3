/**
 * For test files whose tests run a few at a time (describe.concurrent):
 * most of a test's time is spent waiting for a fixture's self-checks
 * (one every 100 ms), which other tests can use. Commands here are run
 * without blocking the event loop (Sandbox.runAsync), and what a test
 * started is removed as it ends, not what another test running beside it
 * started.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { it, type TestContext } from 'vitest';
import { type Result, type Sandbox, waitFor } from './helpers.js';

/** The AID a command line of `run` or `restore` names with --aid (a
 * restore without one takes the image's, registered by its run). */
function aidOf(args: string[]): string | undefined {
  if (args[0] !== 'run' && args[0] !== 'restore') return undefined;
  const i = args.indexOf('--aid');
  const end = args.indexOf('--');
  return i >= 0 && (end < 0 || i < end) ? args[i + 1] : undefined;
}

/**
 * Tests of `sb`, each removing (rm -f) the applications it started as it
 * ends, passed or failed: a restored copy left running keeps checking
 * itself (some burn most of a core), which only took CPU from the tests
 * after it. How many run at once: vitest.config.ts, maxConcurrency.
 */
export function ownedTests(sb: Sandbox) {
  const owned = new AsyncLocalStorage<Set<string>>();
  const own = (args: string[]) => {
    const aid = aidOf(args);
    if (aid !== undefined) owned.getStore()?.add(aid);
  };

  /** A test (sequential within its describe block; blocks run beside
   * each other). */
  function test(name: string, fn: (ctx: TestContext) => Promise<void>, timeout?: number): void {
    it.sequential(
      name,
      async (ctx) => {
        const aids = new Set<string>();
        try {
          await owned.run(aids, () => fn(ctx));
        } finally {
          const left = [...aids].filter((aid) => sb.aids().includes(aid));
          if (left.length) await sb.runAsync(['rm', '-f', ...left]);
        }
      },
      timeout,
    );
  }

  /** `appshot args...` (Sandbox.runAsync); an application it starts is the
   * test's. */
  async function attempt(args: string[]): Promise<Result> {
    own(args);
    return sb.runAsync(args);
  }

  /** `appshot args...`, which must succeed: its standard output. */
  async function ok(args: string[]): Promise<string> {
    const r = await attempt(args);
    if (r.code !== 0) throw new Error(`appshot ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  }

  /** `appshot run -d --aid AID -- argv...`, through the API in this
   * process (what the command does, without starting Node cold for it:
   * `run` is one of the commands the engine does not take). */
  async function start(aid: string, argv: string[]): Promise<void> {
    owned.getStore()?.add(aid);
    const api = await import('../src/api.js');
    await api.run(argv, { home: sb.home, aid });
  }

  /** Sandbox.systemPid, without blocking the event loop. */
  async function systemPid(aid: string, vpid = 2): Promise<number> {
    const apps = await sb.jsonAsync<{ processes: { vpid: number; pid: number }[] }[]>(['ps', aid]);
    return apps[0].processes.find((p) => p.vpid === vpid)!.pid;
  }

  /** Sandbox.exercised, without blocking the event loop. */
  async function exercised(aid: string, what: string): Promise<void> {
    const count = () => (sb.log(aid).match(/^EXERCISED$/gm) ?? []).length;
    const before = count();
    process.kill(await systemPid(aid), 'SIGHUP');
    await waitFor(() => count() > before || /FAIL/.test(sb.log(aid)), 15_000, `${aid} ${what}`);
    const failed = /^FAIL.*$/m.exec(sb.log(aid));
    if (failed) throw new Error(`${aid}: ${failed[0]}`);
  }

  /** Polls `cond` (which may run commands) until it holds, as waitFor
   * does. */
  async function waitForAsync(cond: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await cond())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** The test's: an AID it starts without this file's commands (a
   * command run under setpriv, say). */
  const adopt = (aid: string) => owned.getStore()?.add(aid);

  /** `test`, skipped (reported as such) where `condition` holds, as
   * vitest's it.skipIf. */
  test.skipIf = (condition: unknown) =>
    condition ? (name: string, fn: (ctx: TestContext) => Promise<void> | void, timeout?: number) => it.skip(name, fn, timeout) : test;

  return { test, attempt, ok, start, systemPid, exercised, adopt, waitForAsync };
}
