/**
 * vitest setupFiles: before each test, the worker's event loop gets a turn
 * (its I/O phase, where vitest's RPC answers are read). A test that runs
 * synchronously (spawnSync'd CLI commands, one after another) blocks the
 * worker for its whole length, and the runner goes from one test to the
 * next in microtasks: three such tests of 20 s in a row on a loaded machine
 * were one block of a minute, and the RPC call sent before it timed out
 * ("Timeout calling onTaskUpdate"), failing a run whose tests all passed.
 * With a turn between tests, only one test's own synchronous stretch counts.
 */
import { beforeEach } from 'vitest';

beforeEach(() => new Promise<void>((resolve) => setImmediate(resolve)));
