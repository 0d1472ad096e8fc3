/**
 * Test-only: APPSHOT_TEST_KILL_AT=NAME makes appshot kill itself with
 * SIGKILL when it reaches the point NAME, so that tests can prove a command
 * killed at any instant leaves nothing half-done. The points are the
 * phases a restore or a clone batch goes through (APPSHOT_DEBUG=1 prints
 * them as it reaches them).
 */
export function killPoint(name: string): void {
  if (process.env.APPSHOT_TEST_KILL_AT === name) process.kill(process.pid, 'SIGKILL');
}
