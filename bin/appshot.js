#!/usr/bin/env node
// Node 22.1 and later keep V8's compiled code of these modules on disk
// between runs (module.enableCompileCache); Node 20 has no such API for ES
// modules, and there this does nothing. The imports come after it, so they
// are dynamic: a static one would be loaded first.
import module from 'node:module';

module.enableCompileCache?.();
// A resident engine (src/engine/) serves the command if one runs for this
// state directory (with APPSHOT_ENGINE=auto, clone, restore and snapshot
// start one if none does), unless APPSHOT_ENGINE=off: then only the small client is loaded, not
// the CLI. It answers undefined when the command is one to run here (run,
// exec, logs -f, stdin...) or no engine can serve it.
if (process.env.APPSHOT_ENGINE !== 'off') {
  const { viaEngine } = await import('../dist/engine/client.js');
  const code = await viaEngine(process.argv.slice(2));
  if (code !== undefined) process.exit(code);
}
const { main } = await import('../dist/cli.js');
await main();
