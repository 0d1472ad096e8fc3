/*
 * A fault guard for reads and writes through a mapping of an application's
 * table file (appshot_table.h).
 *
 * Every process of an application holds its table file open read-write
 * (APPSHOT_TABLES_FD), whatever uid it runs as: it may truncate the file
 * at any moment. A page of a MAP_SHARED mapping past the file's end is
 * SIGBUS on touch, and a SIGBUS nobody handles ends the process: the
 * resident engine (every command of its user, every application's
 * snapshot and restore in flight) or the CLI. Checking the size before a
 * call cannot help: the truncation may come between the check and any
 * access of the call. So each access runs under this guard: a SIGBUS that
 * the kernel raises for an address inside the guarded mapping, on the
 * thread that guards it, ends the guarded step early (siglongjmp back to
 * tables_guard_run) instead of the process. A SIGBUS anywhere else goes on
 * to whatever handled it before (chained, run as the kernel would have run
 * it: its kind, mask, SA_NODEFER and SA_RESETHAND), or to the default
 * action.
 *
 * Nothing may set a SIGBUS handler after the guard's: that one would get
 * the faults of guarded steps, and Node's (JS process.on('SIGBUS'), which
 * libuv installs over ours without keeping it) only notes the signal and
 * returns, to the same fault, for ever. A step finds that out as it starts
 * and is refused (-1, ENOTRECOVERABLE) rather than run unguarded; the
 * resident engine refuses such a listener outright (src/engine/server.ts).
 *
 * What runs under the guard must be plain C data movement and table calls:
 * no allocation, no lock of the process (malloc's, a mutex), no JS, no C++
 * object with a destructor: a fault abandons the step where it is. The
 * table lock (appshot_lock) is the exception it copes with: the signal
 * mask and the thread's robust-list pending entry are put back as they
 * were, and the caller lets the word go if it still names its thread
 * (tables_guard_drop_lock). The lock must leave SIGBUS unblocked while it
 * is held (appshot_set_lock_spares_faults): a fault the kernel raises while
 * the signal is blocked kills the process whatever its handler.
 */
#ifndef APPSHOT_TABLESGUARD_H
#define APPSHOT_TABLESGUARD_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Installs the process-wide SIGBUS handler, once (later calls do nothing).
 * 0, or -1 with errno from sigaction. */
int tables_guard_install(void);

/* Runs body(arg), guarding [base, base + len). 0 when it ran to its end;
 * 1 when a SIGBUS inside the range ended it early (the file shrank under
 * it); -1 when no guard could be set up, body not run: errno EAGAIN, more
 * threads guarding at once than it has room for; ENOTRECOVERABLE, SIGBUS's
 * handler is no longer the guard's (above). */
int tables_guard_run(const void *base, size_t len, void (*body)(void *), void *arg);

/* After a guarded step that took the table lock ended early: lets the
 * lock word at `word` go if it names the calling thread, marked as a dead
 * holder's (FUTEX_OWNER_DIED) so that the next locker repairs what the
 * step may have left half-written (under the guard again: the file may
 * still be short). */
void tables_guard_drop_lock(const void *base, size_t len, unsigned *word);

#ifdef __cplusplus
}
#endif

#endif
