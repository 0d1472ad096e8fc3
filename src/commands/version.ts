/**
 * `appshot version`: what this appshot is and what it runs on, for bug
 * reports and for telling whether two nodes can exchange images (the image
 * format) and whether a running application's tables are understood (the
 * table layout).
 */
import type { Command } from 'commander';
import { readFileSync } from 'node:fs';
import { release, machine } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { printJson } from './json.js';

let version: string | undefined;

/** package.json's version: the one `npm pack` ships. Read once per
 * process: the engine builds the command line (with --version) for every
 * request, and a package updated under it goes on running the code it
 * loaded, whose version this is. */
export function appshotVersion(): string {
  version ??= (JSON.parse(readFileSync(join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'package.json'), 'utf8')) as { version: string }).version;
  return version;
}

export interface VersionInfo {
  schema: 'appshot.version/1';
  appshot: string;
  node: string;
  kernel: { release: string; machine: string };
  /** The image format this appshot writes and reads (manifest formatVersion). */
  imageFormat: number;
  /** The translation tables' layout (APPSHOT_TABLE_VERSION); null when the
   * native part is not built. */
  tableVersion: number | null;
}

export async function versionInfo(): Promise<VersionInfo> {
  const { FORMAT_VERSION } = await import('../image/format.js');
  let tableVersion: number | null = null;
  try {
    const { addon } = await import('../native.js');
    tableVersion = addon().tableVersion;
  } catch {
    /* reported as null: `appshot check` says what is missing */
  }
  return {
    schema: 'appshot.version/1',
    appshot: appshotVersion(),
    node: process.versions.node,
    kernel: { release: release(), machine: machine() },
    imageFormat: FORMAT_VERSION,
    tableVersion,
  };
}

export function registerVersion(program: Command): void {
  program
    .command('version')
    .description('print the versions of appshot, Node, the kernel, the image format and the table layout')
    .option('--json', 'machine-readable output')
    .addHelpText('after', '\nappshot --version prints only appshot\'s own version.\n\nExamples:\n  appshot version\n  appshot version --json')
    .action(async (opts: { json?: boolean }) => {
      const v = await versionInfo();
      if (opts.json) {
        printJson('version', v);
        return;
      }
      process.stdout.write(
        `appshot       ${v.appshot}\n` +
          `node          ${v.node}\n` +
          `kernel        ${v.kernel.release} (${v.kernel.machine})\n` +
          `image format  ${v.imageFormat}\n` +
          `tables        ${v.tableVersion ?? 'unknown (native part not built)'}\n`,
      );
    });
}
