#!/usr/bin/env node
/**
 * npm's `install` step runs this before node-gyp builds the native parts.
 * Without a compiler, node-gyp fails with dozens of lines in which the
 * cause (`g++: not found`, a missing libc.a at the static link of
 * appshot-init) is easy to miss; this says it in one line, with what to
 * install, and exits 1 before node-gyp starts.
 *
 * What node-gyp's Makefiles call: $CC (make's default `cc`) for C, $CXX
 * (make's default `g++`) for C++ and for linking, `make`, and Python 3 for
 * gyp itself, chosen as node-gyp's find-python chooses it (see usablePython).
 * appshot-init is linked -static-pie, which needs libc.a (libc6-dev; g++
 * brings it on Debian).
 */
import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync } from 'node:fs';
import { delimiter, isAbsolute, join } from 'node:path';

/** The path of `command` as a shell would find it, or undefined. */
function found(command) {
  if (!command) return undefined;
  const candidates = isAbsolute(command) || command.includes('/') ? [command] : (process.env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, command));
  for (const path of candidates) {
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // not there, or not executable
    }
  }
  return undefined;
}

/** The words of a setting like CC="ccache gcc", as make's shell splits them; the first is the program run. */
const words = (setting, fallback) => (setting?.trim() ? setting.trim().split(/\s+/) : [fallback]);

const ccWords = words(process.env.CC, 'cc');
const cc = ccWords[0];
const cxx = words(process.env.CXX, 'g++')[0];

/** Whether `command` runs as Python 3.6 or later, which node-gyp requires. */
function isPython3(command) {
  const path = found(command);
  if (!path) return false;
  const r = spawnSync(path, ['-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 6) else 1)'], { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0;
}

/**
 * What is wrong with the Python node-gyp would look for, or undefined if it
 * will find one. NODE_GYP_FORCE_PYTHON, when set, is the only one it tries.
 * Otherwise it tries npm's `python` setting (npm_config_python), PYTHON,
 * python3 and python in turn, passing over any that is missing or not
 * Python 3.6+: a stale PYTHON is no reason to stop.
 */
function pythonProblem() {
  const forced = process.env.NODE_GYP_FORCE_PYTHON;
  if (forced) {
    if (isPython3(forced)) return undefined;
    const what = found(forced) ? 'is not Python 3.6 or later: point it at one' : 'not found: install it';
    return { setting: `NODE_GYP_FORCE_PYTHON=${forced} ${what} or unset NODE_GYP_FORCE_PYTHON` };
  }
  const candidates = [process.env.npm_config_python, process.env.PYTHON, 'python3', 'python'].filter(Boolean);
  return candidates.some(isPython3) ? undefined : { tool: 'python3' };
}

// Each missing tool, and the Debian package that brings it.
const missing = [];
// Each variable that names a tool which is not there.
const settings = [];
// A compiler the user chose is theirs to install (or unset): naming the
// Debian package of the default one would not help.
for (const [name, program, fallback] of [['CXX', cxx, 'g++'], ['CC', cc, 'cc']]) {
  if (found(program)) continue;
  const setting = process.env[name]?.trim();
  if (setting) settings.push(`${name}=${/\s/.test(setting) ? `"${setting}"` : setting} not found: install it or unset ${name}`);
  else missing.push([fallback, 'g++']);
}
if (!found('make')) missing.push(['make', 'make']);
const python = pythonProblem();
if (python?.tool) missing.push([python.tool, 'python3']);
if (python?.setting) settings.push(python.setting);
if (found(cc)) {
  // cc answers a bare "libc.a" when it has none to link with. Every word of
  // CC is run: a launcher (ccache, sccache, distcc) would take the option
  // as its own.
  const r = spawnSync(found(cc), [...ccWords.slice(1), '-print-file-name=libc.a'], { encoding: 'utf8' });
  const libc = r.status === 0 ? r.stdout.trim() : '';
  if (!isAbsolute(libc) || !existsSync(libc)) missing.push(['libc.a (C library headers and static library)', 'libc6-dev']);
}

const problems = [...settings];
if (missing.length) {
  const names = [...new Set(missing.map(([tool]) => tool))].join(', ');
  const packages = [...new Set(['g++', 'make', 'python3', ...missing.map(([, pkg]) => pkg)])].join(' ');
  const how = found('apt-get') || existsSync('/etc/debian_version') ? `apt-get install -y ${packages}` : `install a C and C++ compiler, make, python3 and the C library's static library`;
  problems.push(`building the native addon needs g++, make and python3 (not found: ${names}): ${how}`);
}
if (problems.length) {
  process.stderr.write(`appshot: ${problems.join('; ')}\n`);
  process.exit(1);
}
