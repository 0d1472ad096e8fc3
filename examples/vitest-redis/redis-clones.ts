/**
 * One loaded redis, many copies: starts redis-server under appshot, loads
 * a dataset into it, snapshots it, makes a template of the snapshot and
 * stamps `count` clones from it, each a database of its own (the dataset
 * included) on a port of its own, in milliseconds each. Loading once and
 * cloning is what makes a per-worker database cheap when loading is slow.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { clone, rm, run, snapshot, templateCreate } from 'appshot';

export interface RedisClone {
  aid: string;
  /** The port this clone answers on. */
  port: number;
}

export interface RedisClones {
  clones: RedisClone[];
  /** Time appshot took to stamp each clone. */
  cloneMs: number[];
  /** Ends every clone; resolves once they are gone. */
  stop(): Promise<void>;
}

export interface RedisClonesOptions {
  count: number;
  /** An empty directory for appshot's registry, the image and the
   * template; removing it afterwards is the caller's. */
  dir: string;
  /** redis-cli input that loads the dataset, one command a line. */
  load: string[];
  /** A free port for the template redis while it is loaded. */
  port: number;
  redisServer?: string;
}

const rules = fileURLToPath(new URL('./redis.rules', import.meta.url));

/** Sends commands through redis-cli, one a line; resolves with its answers. */
export function redisCli(port: number, commands: string[]): string[] {
  const r = spawnSync('redis-cli', ['-p', String(port)], { input: commands.join('\n') + '\n', encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`redis-cli -p ${port}: ${r.stderr}`);
  return r.stdout.trim().split('\n');
}

async function answers(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (redisCli(port, ['PING'])[0] !== 'PONG') {
    if (Date.now() > deadline) throw new Error(`redis on port ${port} does not answer`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Resolves once no connection to `port` is open on the server's side.
 * A snapshot refuses a TCP connection to outside the application, and a
 * client that has gone leaves one until redis gets round to closing its
 * end (CLOSE_WAIT): under load that can be after redis-cli has exited. */
async function clientsGone(port: number, timeoutMs: number): Promise<void> {
  const ESTABLISHED = 0x01;
  const CLOSE_WAIT = 0x08;
  const open = () =>
    ['/proc/net/tcp', '/proc/net/tcp6'].some((table) =>
      readFileSync(table, 'utf8')
        .split('\n')
        .slice(1)
        .map((line) => line.trim().split(/\s+/))
        .some(([, local, , state]) => local && parseInt(local.split(':')[1], 16) === port && [ESTABLISHED, CLOSE_WAIT].includes(parseInt(state, 16))),
    );
  const deadline = Date.now() + timeoutMs;
  while (open()) {
    if (Date.now() > deadline) throw new Error(`redis on port ${port} keeps a client connection open`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function startRedisClones(opts: RedisClonesOptions): Promise<RedisClones> {
  // A registry of its own: these applications are no one else's business.
  const home = join(opts.dir, 'appshot');
  const redis = await run(
    [opts.redisServer ?? 'redis-server', '--port', String(opts.port), '--save', '', '--appendonly', 'no', '--dir', opts.dir],
    { home, rules },
  );
  await answers(opts.port, 10_000);
  const loaded = redisCli(opts.port, opts.load);
  if (loaded.some((a) => a.startsWith('ERR'))) throw new Error(`loading redis: ${loaded.find((a) => a.startsWith('ERR'))}`);

  await clientsGone(opts.port, 10_000);
  // The snapshot ends the template redis: its port is free again after.
  const image = (await snapshot(redis.aid, { home, output: join(opts.dir, 'loaded.appshot') })).image;
  const template = (await templateCreate(image, join(opts.dir, 'redis.template'), { home })).template;
  const made = await clone(template, { home, count: opts.count, aid: 'redis' });

  const clones = made.map((c) => {
    const own = c.ports.find((p) => p.virtual === opts.port && p.mode === 'allocate');
    if (!own) throw new Error(`clone ${c.aid} has no port of its own for ${opts.port}`);
    return { aid: c.aid, port: own.system };
  });
  return {
    clones,
    cloneMs: made.map((c) => c.cloneMs),
    /** Ends every clone and removes it, with its private copies: resolves
     * once none is left. */
    async stop() {
      for (const c of clones) await rm(c.aid, { home, force: true });
    },
  };
}
