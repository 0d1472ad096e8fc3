/**
 * vitest globalSetup: no test may touch the user's real state directory
 * (/var/lib/appshot for root). Every test file gives the commands it runs
 * a Sandbox's APPSHOT_HOME, but what runs without one (an appshot spawned
 * with process.env, an in-process call whose defaults read
 * $APPSHOT_HOME, such as the image signing key and temporaries of the
 * API) would fall back to it: the workers, forked after this, inherit a
 * throwaway one instead. Removed at the end, with any engine that a stray
 * command started in it.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cli } from './helpers.js';

export default function setup(): () => void {
  const home = mkdtempSync(join(tmpdir(), 'appshot-test-default-home-'));
  process.env.APPSHOT_HOME = home;
  return () => {
    if (existsSync(join(home, 'engine', 'lock')))
      spawnSync(process.execPath, [cli, 'engine', 'stop'], { env: { ...process.env, APPSHOT_HOME: home }, stdio: 'ignore', timeout: 20_000 });
    rmSync(home, { recursive: true, force: true });
  };
}
