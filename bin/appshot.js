#!/usr/bin/env node
// Node 22.1 and later keep V8's compiled code of these modules on disk
// between runs (module.enableCompileCache); Node 20 has no such API for ES
// modules, and there this does nothing. The import comes after it, so it is
// dynamic: a static one would be loaded first.
import module from 'node:module';

module.enableCompileCache?.();
await import('../dist/cli.js');
