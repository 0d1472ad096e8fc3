#!/usr/bin/env node
/**
 * npm's `prepare` step (npm install in a checkout, npm pack, npm install -g
 * of a checkout): generates the protobuf code (scripts/gen-proto.js) and
 * compiles src/ to dist/ with TypeScript, as `npm run build` does. npm runs
 * the native build (binding.gyp) in its own `install` step.
 *
 * `npm install -g /path/to/checkout` links the checkout and installs none
 * of its dependencies (npm's documented behaviour for a folder outside the
 * project), so neither TypeScript nor node-addon-api is there: they are
 * installed here first, from the lockfile, before compiling.
 *
 * A package installed from the tarball never runs this: dist/ is in it.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(join(root, 'package.json'));

function resolves(id) {
  try {
    require.resolve(id);
    return true;
  } catch {
    return false;
  }
}

function runOrExit(command, args, what) {
  const r = spawnSync(command, args, { cwd: root, stdio: 'inherit', env: childEnv() });
  if (r.status !== 0) {
    console.error(`appshot: ${what} failed (${r.status ?? r.signal})`);
    process.exit(r.status || 1);
  }
}

/** The environment without the settings of the npm that runs us which
 * would make a nested `npm install` global, or skip devDependencies. */
function childEnv() {
  const dropped = /^npm_config_(global|prefix|global_prefix|local_prefix|location|omit|include|production|install_links)$/i;
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !dropped.test(k)));
}

if (!resolves('node-addon-api') && !resolves('typescript/package.json')) {
  // A linked checkout without its dependencies (see above).
  const npm = process.env.npm_execpath;
  const [command, args] = npm ? [process.execPath, [npm]] : ['npm', []];
  console.error('appshot: installing the dependencies of this checkout (npm links it without them)');
  runOrExit(command, [...args, 'install', '--no-save', '--include=dev', '--ignore-scripts', '--no-audit', '--no-fund'], 'npm install');
}

if (resolves('typescript/package.json')) {
  runOrExit(process.execPath, [join(root, 'scripts', 'gen-proto.js')], 'generating the protobuf code');
  runOrExit(process.execPath, [require.resolve('typescript/bin/tsc'), '-p', join(root, 'tsconfig.json')], 'tsc');
} else if (!existsSync(join(root, 'dist', 'cli.js')) || !existsSync(join(root, 'proto', 'generated', 'image-proto.js'))) {
  // Installed with --omit=dev from a checkout that was never built.
  console.error('appshot: dist/ is missing and TypeScript is not installed: run `npm install` (with devDependencies) in the checkout');
  process.exit(1);
}
