/*
 * Internal declarations of the appshot preload library.
 *
 * The library lives inside every process of an application and shows it
 * virtual ids (PIDs, TIDs, SysV ids and keys) through the translation tables
 * of appshot_table.h. Without APPSHOT_TABLES, or when the tables cannot be
 * mapped, every wrapper is a plain call of the real function.
 *
 * Rules for every file here: no allocation and no stdio (we run inside
 * signal handlers, between fork and exec, before malloc is usable), and a
 * wrapper must work before our constructor ran (ensure_init).
 */
#ifndef APPSHOT_PRELOAD_H
#define APPSHOT_PRELOAD_H

/* Fortified headers turn open() & co. into inline functions, which would
 * clash with our definitions of the same names. */
#undef _FORTIFY_SOURCE
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h> /* types of fopen & co. only */
#include <string.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* The caller defines it (the kernel's ABI), glibc does not. */
union semun {
  int val;
  struct semid_ds *buf;
  unsigned short *array;
  struct seminfo *__buf;
};

#include "appshot_table.h"
#include "appshot_used.h"

#define API __attribute__((visibility("default")))
#define HIDDEN __attribute__((visibility("hidden")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define TLS_IE __attribute__((tls_model("initial-exec")))

/* --- State (preload_core.c) ---------------------------------------------- */

/* The tables, or NULL: pass-through. */
extern struct appshot_header *g_h HIDDEN;
/* This process's virtual PID (0 = not known yet); valid while !g_nocache.
 * Only virtual ids are cached: they survive a snapshot and restore, where
 * the system ids change under the process's feet. System ids are asked of
 * the kernel on the (rare) paths that need them. */
extern int32_t g_vpid HIDDEN;
/* Set for good once the process shared its memory with another process
 * (clone with CLONE_VM but not CLONE_THREAD): the caches would then be
 * written by both, so getpid/gettid ask the kernel each time. */
extern int g_nocache HIDDEN;
/* Set once a task sharing our memory was made without CLONE_SYSVSEM (and
 * without CLONE_VFORK): it keeps SEM_UNDO adjustments of its own in the
 * kernel, which it gives back when it exits, yet writes the same table
 * (preload_ipc.c). The table's sums are unknown from then on. */
extern int g_sem_undo_split HIDDEN;
static inline void note_sem_undo_split(unsigned long flags) {
  if ((flags & CLONE_VM) && !(flags & (CLONE_SYSVSEM | CLONE_VFORK)))
    __atomic_store_n(&g_sem_undo_split, 1, __ATOMIC_RELAXED);
}
/* A semop on its way through this thread (preload_ipc.c, "A semop in
 * flight"): from just before its system call until its SEM_UNDO
 * adjustments are in the table. A signal whose handler would run while
 * the kernel has made the operation and the table does not hold it yet
 * waits (preload_signal.c): a handler that blocked there was frozen by a
 * snapshot with the adjustment in neither place (review r267). Read by a
 * snapshot at the thread pointer plus the table's flight_tpoff
 * (src/resources/sysv.ts). */
#define SEMOP_IDLE 0
#define SEMOP_ISSUED 1    /* the call made or about to be; result 1 until it returns */
#define SEMOP_RECORDING 2 /* made; its adjustments being written */
struct appshot_semop_flight {
  int32_t state;
  int32_t pad;
  int64_t result;    /* 1 until the call returns, then its result (0, -errno) */
  uint64_t ops;      /* its operations and their count */
  uint64_t nops;
  uint64_t deferred; /* signals (bit sig - 1) held until the write ends */
  /* For a jump out of the call (semop_left_by_jump): the stub's stack
   * pointer at the system call (a signal frame that interrupts the stub
   * holds it), the virtual set id and the generation read before the
   * call (to write the adjustment the kernel made). */
  uint64_t sp;
  int32_t vid;
  uint32_t generation;
};
extern __thread struct appshot_semop_flight t_semop TLS_IE HIDDEN;
/* For the signal stub: whether the thread, interrupted in context `uc`,
 * has a semop made whose adjustments the table does not hold yet. */
HIDDEN int semop_unrecorded(const void *uc);
/* The handler of such a signal cannot wait (a fault, a one-shot handler,
 * the signal could not be queued again): what the table holds is not
 * known from then on. */
HIDDEN void sem_undo_unknown(void);
/* A handler runs on an operation that is not pending (not made, or
 * failed): the thread shows none while it runs (a snapshot that finds it
 * blocked there takes it as it is), and has it back after. */
struct semop_suspended {
  int32_t state;
  int64_t result;
  uint64_t ops, nops, sp;
  int32_t vid;
  uint32_t generation;
};
/* For the signal stub: the thread's semop was interrupted in its stub by
 * a handler the library does not wrap, which the context `uc` is inside
 * of; the note is kept for the handler about to run (preload_ipc.c). */
HIDDEN int semop_under_unwrapped_handler(const void *uc);
HIDDEN void semop_suspend(struct semop_suspended *s);
HIDDEN void semop_resume(const struct semop_suspended *s);
/* For the signal stub, before a program's handler runs: the signals held
 * back (t_semop.deferred) unblocked, here and in the context `uc`. */
HIDDEN void semop_held_release(void *uc);
/* A jump (preload_jump.c) to stack pointer `target`, from code running at
 * `here`, with the thread's sigaltstack [alt, alt + alt_size) (0, 0:
 * none): if it leaves the thread's semop in flight, its note made true
 * (preload_ipc.c, "A jump out of a semop"). */
/* In a fork's child: a semop the fork came inside of, made by the parent,
 * is not written in the child's table (preload_ipc.c). */
HIDDEN void semop_after_fork_child(void);
HIDDEN void semop_left_by_jump(uintptr_t target, uintptr_t here, uintptr_t alt, uintptr_t alt_size);
/* The calling thread's virtual TID; 0 = not known yet. */
extern __thread int32_t t_vtid TLS_IE HIDDEN;
/* --- Translation windows ---------------------------------------------------
 *
 * A thread between a translation and the system call it feeds (kill: the
 * virtual PID made a system PID, not yet sent), or between a system call
 * and the translation of its answer (getppid: the kernel's system PID, not
 * yet made virtual), holds a system id of this node in its registers or
 * stack. Snapshotted there and restored, it would use that id on the new
 * node, where it names another process or none. So every wrapper that
 * translates ids raises t_id_window.open for as long as it runs
 * (ID_WINDOW(), lowered when the function returns), and a snapshot lets a
 * thread it stopped with the mark raised run on until it is lowered,
 * unless the thread is blocked in a system call, whose restart on the new
 * node gets a fresh answer (src/ptrace/windows.ts). The snapshot finds the
 * mark by its offset from the thread pointer, which init publishes in
 * appshot_id_window_tpoff (an exported symbol).
 *
 * `open` counts, so that a handler's window inside another's nests. A
 * window left by a (sig)longjmp out of a signal handler never closes by
 * itself: our longjmp wrappers close the windows the jump leaves
 * (preload_jump.c), by `sp`, the stack pointer where the outermost open
 * window began, which also tells a snapshot that a thread above it (on the
 * same stack) is out of it. Should a jump escape the wrappers (a jump
 * inside another library, a raw one), the next window that begins above
 * `sp` on the same stack starts afresh. A window that begins above `sp` on
 * another stack (a handler on a sigaltstack higher than the thread's
 * stack) nests, and moves `sp` up to itself, so that the snapshot sees the
 * thread inside while the handler runs on. A window inside another must
 * begin in a deeper frame: so a function with a window that runs while
 * its caller holds one is never inlined into it (NOINLINE, or no window of
 * its own), since inlined (LTO inlines across files) its window would
 * begin at the caller's stack pointer, which reads as a window a jump
 * left, and closes the caller's with it. A TLS store or two: no
 * system call (but on those rare paths), nothing allocated, safe in a
 * signal handler. */
#define APPSHOT_WINDOW_DEPTH 8
struct appshot_id_window {
  int32_t open; /* windows open */
  int32_t pad;
  uintptr_t sp; /* the stack pointer where the outermost one began */
  /* Where each open window began, outermost first (the first
   * APPSHOT_WINDOW_DEPTH): a jump closes exactly those it leaves, an inner
   * one nested in a handler as well as all (preload_jump.c). Offset 16:
   * the signal stub writes it. */
  uintptr_t began[APPSHOT_WINDOW_DEPTH];
};
extern __thread struct appshot_id_window t_id_window TLS_IE HIDDEN;

/* An epoll wait with a timeout, as the thread began it (preload_wait.c):
 * the CLOCK_MONOTONIC instant its timeout ends (0: none), its arguments,
 * the wrapper's stack pointer (the call is below it; a thread that jumped
 * out of the wrapper is above) and the restore generation it was noted in
 * (appshot_restore_generation, which each restore of the process counts
 * up: an instant noted before a restore is of another clock's time). Read
 * by a snapshot (src/resources/threads.ts TIMED_WAIT). */
struct appshot_timed_wait {
  int64_t deadline;
  int64_t epfd, events, maxevents, timeout;
  uint64_t sp;
  int64_t generation;
  /* Not the epoll wait's: the mutex of the condition wait the thread is
   * in (preload_mutex.c), 0 for none. A restore gives a private PI one's
   * word its holder's TID now, which glibc's relock inside the wait
   * hands the kernel. */
  uint64_t cond_mutex;
};
extern int64_t appshot_restore_generation __attribute__((visibility("default")));
extern __thread struct appshot_timed_wait t_timed_wait TLS_IE HIDDEN;
extern long appshot_timed_wait_tpoff __attribute__((visibility("default")));
extern long appshot_id_window_tpoff __attribute__((visibility("default")));
/* Set for good once a clone() with CLONE_VM but not CLONE_SETTLS was made:
 * the child runs on its parent's thread pointer, so two threads share one
 * t_id_window. A window one of them begins above the other's `sp` is then
 * no sign of a longjmp (it nests: `sp` stays, naming the deeper one), and
 * the count is changed atomically. The snapshot, for its part, cannot
 * tell which of the sharers is inside, and takes all of them as inside
 * while the mark is raised (src/ptrace/windows.ts). */
extern int g_tls_shared HIDDEN;
static inline __attribute__((always_inline)) uintptr_t stack_pointer(void) {
  uintptr_t sp;
  __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
  return sp;
}
/* A window begins at `sp`, at or above the outermost open one: closes the
 * open ones if they are on the same stack (left by a longjmp), else moves
 * the outermost's `sp` up to `sp` (nested, on a higher stack). A system
 * call (sigaltstack): only on this rare path (preload_jump.c). */
HIDDEN void id_window_above(uintptr_t sp);
/* The same, for the signal stub (preload_signal.c), which has already
 * raised its window at its own stack pointer over open ones that began at
 * `older`: leaves only its own open if they were on the same stack. */
HIDDEN void id_window_raised_above(uintptr_t older);
/* The rare paths of a mark shared by threads (g_tls_shared): atomic, and
 * no longjmp guess (preload_jump.c). */
HIDDEN void id_window_open_shared(uintptr_t sp);
HIDDEN void id_window_close_shared(void);
/* --- Freeze gate --------------------------------------------------------
 *
 * A thread that forks or reaps without a pause spends most of its time
 * inside windows: a snapshot that lets it run on (windows.ts) catches it
 * inside the next one nearly every time. So, as DMTCP's checkpoint
 * barrier does, the snapshot closes a per-process gate (writes `closed`
 * and `deadline_ns` by process_vm_writev; src/ptrace/freezer.ts) when it
 * finds threads inside, and an outermost window (none open on the thread)
 * does not begin while the gate is closed: the thread waits in front of
 * it, outside, in FUTEX_WAIT_PRIVATE, where the snapshot stops it (a
 * thread blocked in a system call outside any window is fine to take).
 * Never inside an open window, nor in a handler that interrupted one (the
 * window is open then), nor in the signal stub (it raises its window by
 * itself): a thread holding a system id is never held.
 *
 * The snapshot opens the gate again (closed = 0) before it writes the
 * image and before it lets the application go, whichever way it ends: a
 * waiter stopped there and resumed, here or restored from the image,
 * finds the word changed and returns at once (EAGAIN). The deadline
 * (CLOCK_MONOTONIC, the node's) bounds what a snapshot killed with the
 * gate closed leaves: the application goes on by itself once it passes;
 * the snapshot keeps it a second ahead while it works. A deadline further
 * ahead than any snapshot sets (another clock: a time namespace, an image
 * restored on another boot) counts as passed. Each wait is capped, so a
 * gate opened while a waiter was not stopped (the snapshot cannot wake a
 * private futex) holds it at most that long. The exported alias
 * appshot_freeze_gate names it for the snapshot; the wrappers use the
 * hidden name (no GOT load on the hot path). */
struct appshot_freeze_gate {
  int32_t closed; /* the futex word: 0 open, 1 closed */
  int32_t pad;
  int64_t deadline_ns; /* closed until then at most (CLOCK_MONOTONIC) */
};
extern struct appshot_freeze_gate g_freeze_gate HIDDEN;
/* Waits while the gate is closed and its deadline not passed (the slow
 * path, preload_gate.c); errno is kept. */
HIDDEN void freeze_gate_wait(void);
/* Always inlined: `sp` must be the wrapper's own stack pointer. Taken in a
 * function of its own (LTO outlines these once they grow), it would lie
 * below the wrapper's frame, and a thread stopped back in that frame (at
 * the system call the window guards) would read as above it: outside. */
#define WINDOW_INLINE static inline __attribute__((always_inline))
WINDOW_INLINE void id_window_close(int *unused) {
  (void)unused;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  if (UNLIKELY(__atomic_load_n(&g_tls_shared, __ATOMIC_RELAXED))) {
    id_window_close_shared();
    return;
  }
  if (t_id_window.open > 0) t_id_window.open--;
}
WINDOW_INLINE int id_window_open(void) {
  /* The freeze gate, in front of an outermost window only. */
  if (UNLIKELY(__atomic_load_n(&g_freeze_gate.closed, __ATOMIC_RELAXED)) &&
      __atomic_load_n(&t_id_window.open, __ATOMIC_RELAXED) <= 0)
    freeze_gate_wait();
  uintptr_t sp = stack_pointer();
  if (UNLIKELY(__atomic_load_n(&g_tls_shared, __ATOMIC_RELAXED))) {
    id_window_open_shared(sp);
    return 0;
  }
  /* At or above the outermost window's start (a window inside a live one
   * begins deeper, in a callee or a handler): that one was left by a
   * longjmp, unless it is on another stack (preload_jump.c). */
  if (UNLIKELY(t_id_window.open > 0 && sp >= t_id_window.sp))
    id_window_above(sp);
  int32_t depth = t_id_window.open;
  if (depth == 0) t_id_window.sp = sp;
  if (LIKELY(depth < APPSHOT_WINDOW_DEPTH)) t_id_window.began[depth] = sp;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_id_window.open = depth + 1;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  return 0;
}
#define ID_WINDOW() \
  int id_window_ __attribute__((cleanup(id_window_close), unused)) = id_window_open()
/* The same, only if `cond` holds. */
WINDOW_INLINE void id_window_close_if(int *opened) {
  if (*opened) id_window_close(opened);
}
#define ID_WINDOW_IF(cond)                                            \
  int id_window_ __attribute__((cleanup(id_window_close_if), unused)) = \
      (cond) ? (id_window_open(), 1) : 0

/* Test-only pause points. A test program that defines and exports this
 * function (test/fixtures/common.c) is called at each point named `where`
 * that a snapshot must be able to catch a thread at (a wait answered and
 * not yet translated...), and may hold the thread there. Nothing else can
 * switch it on: no environment variable or file, only a program written to
 * be paused; in any other program the weak reference is null, resolved
 * once at load, and the point costs a not-taken branch. */
extern void appshot_test_pause(const char *where)
    __attribute__((weak, visibility("default")));
static inline void test_pause(const char *where) {
  if (UNLIKELY(appshot_test_pause != NULL)) appshot_test_pause(where);
}

/* Our descriptor of the table file (-1: none), kept open across exec at a
 * high number and named to the next program by APPSHOT_TABLES_FD: a program
 * that changed user cannot open the file (mode 0600) by its path any more,
 * but inherits this. The program may not close it or take its number away
 * (see preload_fd.c). */
extern int g_tables_fd HIDDEN;

/* The state of init: 2 once done. */
extern int g_init_state HIDDEN;
HIDDEN void init_slow(void);
static inline void ensure_init(void) {
  if (UNLIKELY(__atomic_load_n(&g_init_state, __ATOMIC_ACQUIRE) != 2))
    init_slow();
}

/* Real libc functions, resolved once with dlsym(RTLD_NEXT) at init. Used
 * where a bare system call would not do: fork must run the atfork handlers,
 * exec and spawn must be glibc's, stdio and dirent build objects, and the
 * blocking calls are pthread cancellation points. Simple id calls go
 * straight to the kernel (appshot_raw_syscall). */
#define REAL_FUNCS(X)                                                       \
  X(fork) X(clone) X(execve) X(execvpe) X(fexecve) X(posix_spawn)          \
  X(posix_spawnp) X(wait4) X(waitid)          \
  X(sigtimedwait) X(sigwaitinfo) X(sigqueue) X(semtimedop) X(semctl)       \
  X(shmctl) X(shmat) X(msgctl) X(msgsnd) X(msgrcv) X(open) X(open64)       \
  X(openat) X(openat64) X(__open_2) X(__open64_2) X(__openat_2)            \
  X(__openat64_2) X(creat) X(creat64) X(fopen) X(fopen64) X(opendir) X(readdir64) X(readdir64_r) X(closedir) X(scandir64) X(scandirat64) X(stat)          \
  X(stat64) X(lstat) X(lstat64) X(fstatat) X(fstatat64) X(statx)          \
  X(__xstat) X(__xstat64) X(__lxstat) X(__lxstat64) X(__fxstatat)        \
  X(__fxstatat64) X(access) X(faccessat) X(euidaccess) X(eaccess)         \
  X(readlink) X(readlinkat) X(chdir) X(close) X(fchmodat) X(lutimes) \
  X(getcwd) X(get_current_dir_name) X(realpath)                            \
  X(closefrom) X(fcntl64) X(read) X(write) X(recvmsg) X(sendmsg)          \
  X(recvmmsg) X(sendmmsg)                                                  \
  X(posix_spawn_file_actions_addclose) X(posix_spawn_file_actions_adddup2) \
  X(posix_spawn_file_actions_addopen) X(posix_spawn_file_actions_addchdir_np) \
  X(clock_gettime) X(clock_nanosleep) X(timer_create) X(timer_settime)    \
  X(pthread_getcpuclockid) X(pthread_mutex_timedlock) X(pthread_mutex_clocklock) \
  X(pthread_cond_wait) X(pthread_cond_timedwait) X(pthread_cond_clockwait) \
  X(epoll_wait) X(epoll_pwait) X(mq_notify) X(pthread_kill) X(pthread_sigqueue) X(raise) X(ioctl) \
  X(connect) X(sendto) X(recvfrom) X(accept) X(accept4)

/* glibc's compatibility versions that the library's own compatibility
 * versions (COMPAT_VERSION) hand on to, where theirs differ from the
 * current function (another ABI, or another behaviour): index name,
 * symbol, version. Resolved with dlvsym at init; null where this glibc
 * has no such version (then no program can be bound to it either). */
#define REAL_COMPAT_FUNCS(X)                                                \
  X(timer_create_2_2_5, timer_create, "GLIBC_2.2.5")                       \
  X(posix_spawn_2_2_5, posix_spawn, "GLIBC_2.2.5")                         \
  X(posix_spawnp_2_2_5, posix_spawnp, "GLIBC_2.2.5")

enum {
#define X(n) R_##n,
  REAL_FUNCS(X)
#undef X
  R_PLAIN_COUNT,
  R_COMPAT_BEFORE = R_PLAIN_COUNT - 1,
#define X(n, sym, ver) R_##n,
  REAL_COMPAT_FUNCS(X)
#undef X
  R_COUNT
};
extern void *real_fn[R_COUNT] HIDDEN;
#define REAL(n) ((__typeof__(&n))real_fn[R_##n])

/* Defines the library's function for a compatibility version of a glibc
 * symbol (`symbol@version`, never the default: preload.map names those).
 * glibc keeps an old version of a few functions for programs linked
 * before it changed (another ABI, or behaviour): a program bound to it
 * names that version, and an unversioned definition of ours would take
 * the reference and treat it as the current function. The C name is the
 * library's own (appshot_compat_*), kept local by preload.map: only the
 * versioned name is exported. */
#define COMPAT_VERSION(symbol_at_version) \
  __attribute__((visibility("default"), symver(symbol_at_version)))
/* A symbol version of the function it is given to (`symbol@@version`: the
 * default; `symbol@version`: an older one of the same ABI). A function with
 * more than one version has a C name of its own (appshot_current_*, kept
 * local by preload.map): named as the symbol, the linker's plugin took its
 * plain definition and the versioned ones for two definitions. */
#define SYMVER(symbol_at_version) __attribute__((symver(symbol_at_version)))

/* Only declared by the fortified headers, which we turn off. */
int __open_2(const char *, int);
int __open64_2(const char *, int);
int __openat_2(int, const char *, int);
int __openat64_2(int, const char *, int);
void __chk_fail(void) __attribute__((noreturn));
/* glibc's versioned stat calls, declared by <sys/stat.h> until 2.33: what
 * programs built before it call for stat, lstat and fstatat (its inline
 * functions did), still exported. */
int __xstat(int, const char *, struct stat *);
int __xstat64(int, const char *, struct stat64 *);
int __lxstat(int, const char *, struct stat *);
int __lxstat64(int, const char *, struct stat64 *);
int __fxstatat(int, int, const char *, struct stat *, int);
int __fxstatat64(int, int, const char *, struct stat64 *, int);
/* The same for mknod and mknodat. */
int __xmknod(int, const char *, mode_t, dev_t *);
int __xmknodat(int, int, const char *, mode_t, dev_t *);

/* --- System calls without libc (preload_core.c) -------------------------- */

/* A raw system call (appshot_table.h appshot_raw_syscall, inline): used
 * instead of libc for the simple id calls: it is async-signal-safe, needs
 * no resolution before init, and never lands in one of our own wrappers. */
#define SYS0(n) appshot_raw_syscall(SYS_##n, 0, 0, 0, 0, 0, 0)
#define SYS1(n, a) appshot_raw_syscall(SYS_##n, (long)(a), 0, 0, 0, 0, 0)
#define SYS2(n, a, b) appshot_raw_syscall(SYS_##n, (long)(a), (long)(b), 0, 0, 0, 0)
#define SYS3(n, a, b, c) appshot_raw_syscall(SYS_##n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define SYS4(n, a, b, c, d) \
  appshot_raw_syscall(SYS_##n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define SYS5(n, a, b, c, d, e) \
  appshot_raw_syscall(SYS_##n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)
#define SYS6(n, a, b, c, d, e, f)                                         \
  appshot_raw_syscall(SYS_##n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), \
       (long)(f))

/* Writes v in decimal at d (no NUL); returns the end. No stdio here. */
static inline char *put_decimal(char *d, unsigned long v) {
  char tmp[24];
  int n = 0;
  do tmp[n++] = (char)('0' + v % 10);
  while ((v /= 10) > 0);
  while (n) *d++ = tmp[--n];
  return d;
}

/* Turns a raw result into the libc convention: -1 and errno. */
static inline long libc_ret(long r) {
  if (UNLIKELY(r < 0 && r > -4096)) {
    errno = (int)-r;
    return -1;
  }
  return r;
}
static inline long fail(int err) {
  errno = err;
  return -1;
}

/* --- cgroup.procs (preload_cgroup.c) ------------------------------------ */

/* `fd`, just opened on `path`: tracked if it is a cgroup's cgroup.procs or
 * cgroup.threads, whose writes name processes. */
HIDDEN void cgroup_procs_opened(int fd, const char *path);
HIDDEN void cgroup_procs_forget(int fd);
HIDDEN void cgroup_procs_forget_range(unsigned int first, unsigned int last);
/* preload_inotify.c: the highest watch descriptor given on each inotify
 * descriptor (appshot_inotify_last_wd), kept with the descriptor. */
HIDDEN void inotify_wd_forget(int fd);
HIDDEN void inotify_wd_forget_range(unsigned int first, unsigned int last);
HIDDEN void inotify_wd_copy(int from, int to);
HIDDEN int cgroup_procs_marked(int fd);
/* Whether `fd` has a place among the marks (a descriptor past it is
 * written untranslated). */
HIDDEN int cgroup_procs_markable(int fd);
/* Writes buf to `fd`, a cgroup's list: one id in decimal, with white space
 * around it (what the kernel parses), written as its system id (ESRCH for
 * one the application does not hold); anything else as it is. */
HIDDEN ssize_t cgroup_write_ids(int fd, const char *buf, size_t count);
HIDDEN void cgroup_procs_mark(int fd, int on);

/* --- Translated views of files that list PIDs (preload_view.c) --------- */

/* After an open by `path` (relative to any directory) that returned `fd`
 * (or -1): a read-only or read-write open of /proc/locks,
 * /proc/sysvipc/<kind>, /proc/<pid>/fdinfo/<n>, a process's stat, status
 * & co. or a cgroup's list of processes gets a copy of the text with
 * virtual PIDs in its place (a cgroup's list and a sched file read-write:
 * their writes go through, view_write_through); which file it is, the
 * descriptor says. Returns fd, or -1 and errno when the copy
 * cannot be made (fd is then closed). */
HIDDEN int view_opened(int fd, const char *path, int flags);
/* The same for a descriptor the caller will close itself on failure
 * (fopen's): 0, or -errno with fd untouched. */
HIDDEN long view_fill(int fd, const char *path, int flags);
/* A write() to a marked descriptor (preload_cgroup.c) that is the view of
 * a cgroup's list or a sched file opened read-write: written to the
 * kernel's file, opened again by the name the view keeps (a cgroup list's
 * id translated), *result what write() returns, and 1; 0 when `fd` is no
 * such view. */
HIDDEN int view_write_through(int fd, const char *buf, size_t count, ssize_t *result);

/* preload_proc.c: whether the working directory is inside /proc (1), not
 * (0), or not known yet (-1); cwd_in_proc_slow finds out (one readlink)
 * and keeps the answer until the next chdir or fchdir (cwd_moved). */
extern int g_cwd_in_proc HIDDEN;
HIDDEN int cwd_in_proc_slow(void);
static inline int cwd_in_proc(void) {
  int in = g_cwd_in_proc;
  return in >= 0 ? in : cwd_in_proc_slow();
}
static inline void cwd_moved(void) { g_cwd_in_proc = -1; }

/* Whether `path` begins with a name that is a number, "<digits>" or
 * "<digits>/..." (not "2024-01.log"): what an id is in a path. */
static inline int starts_with_number(const char *path) {
  if (path[0] < '1' || path[0] > '9') return 0;
  const char *s = path + 1;
  while (*s >= '0' && *s <= '9') s++;
  return *s == '/' || *s == '\0';
}

/* A path relative to a directory of /proc (a descriptor of one, or the
 * working directory inside /proc with AT_FDCWD) that begins with a number
 * ("<pid>/status" under /proc, "<tid>/stat" under /proc/<pid>/task) or
 * "task/" (under /proc/<pid>) may name a process or thread by virtual id.
 * Only then is the directory looked at (proc_at_path): a name of digits
 * under a directory descriptor costs a statfs call (proc_dir_link). */
/* Whether relative `path` starts with "." (".", "..", "./", "../", or a
 * hidden name: a false alarm costs a look at the directory) or has a "."
 * or ".." component: under a directory of /proc it may lead to a process
 * by its number ("self/../2/stat" under /proc, "../2/stat" under
 * /proc/self), which the kernel reads as a system PID (proc_at_join). */
static inline int rel_dotted(const char *path) {
  if (path[0] == '.') return 1;
  for (const char *s = path; *s; s++)
    if (s[0] == '/' && s[1] == '.' && (s[2] == '/' || !s[2] || (s[2] == '.' && (s[3] == '/' || !s[3]))))
      return 1;
  return 0;
}
/* Whether `path` has a place where a number may be read in /proc's own
 * directory when it is walked from outside it (preload_proc.c,
 * next_proc_anchor): a number after a "proc" component ("proc/<vpid>"
 * from "/", "../proc/<vpid>" from /tmp), or right after a "..", "cwd" or
 * "fd/<n>" ("fd/../../<vpid>" and "fd/3/<vpid>" from /dev: review r442
 * F1). Relative from a directory outside /proc, or absolute with a ".."
 * outside /proc. The kernel would read that number as a system id. Names
 * only, one pass; out of line (every wrapper's hook test asks it of a
 * relative path). */
HIDDEN int rel_reaches_number(const char *path);
/* The end (an offset into `path`, at the '/' after it) of the first link
 * component of a process's or thread's directory ("root", "cwd",
 * "fd/<n>") that a number component follows somewhere after it
 * ("self/root/proc/<vpid>", "/proc/self/cwd/<vpid>" with the working
 * directory in /proc, "/dev/fd/3/<vpid>" with 3 a descriptor of /proc):
 * the kernel follows the link and reads that number as a system id
 * (review r432 N1). 0 when there is none. One pass, names only. */
static inline size_t link_before_number(const char *path) {
  const char *link = NULL;
  for (const char *c = path; *c;) {
    const char *e = c;
    while (*e && *e != '/') e++;
    if (link && starts_with_number(c)) return (size_t)(link - path);
    if (!link && *e) {
      if ((e - c == 4 && !memcmp(c, "root", 4)) || (e - c == 3 && !memcmp(c, "cwd", 3))) {
        link = e;
      } else if (e - c == 2 && !memcmp(c, "fd", 2) && e[1] >= '0' && e[1] <= '9') {
        const char *d = e + 1;
        while (*d >= '0' && *d <= '9') d++;
        if (*d == '/') link = e = d;
      }
    }
    c = *e ? e + 1 : e;
  }
  return 0;
}
/* Under a directory of descriptors (/proc/<pid>/fd, a kind INSIDE), a
 * relative path "<n>/.../<number>": the link is its first name. */
static inline int fd_link_before_number(const char *path) {
  const char *s = path;
  while (*s >= '0' && *s <= '9') s++;
  if (s == path || *s != '/') return 0;
  for (; *s; s++)
    if (s[0] == '/' && starts_with_number(s + 1)) return 1;
  return 0;
}
/* link_before_number of an absolute path under /proc or /dev/fd (no
 * other directory of that name is a link of /proc's). */
static inline size_t proc_link_ahead(const char *path) {
  if (strncmp(path, "/proc/", 6) != 0 && strncmp(path, "/dev/fd/", 8) != 0) return 0;
  return link_before_number(path);
}
static inline int proc_at_hooked(int dirfd, const char *path) {
  if (!g_h || !path || path[0] == '/' || (dirfd < 0 && dirfd != AT_FDCWD)) return 0;
  if ((starts_with_number(path) || (path[0] == 't' && !strncmp(path, "task/", 5)) || UNLIKELY(rel_dotted(path)) ||
       UNLIKELY(link_before_number(path))) &&
      (dirfd >= 0 || cwd_in_proc()))
    return 1;
  return UNLIKELY(rel_reaches_number(path));
}
#define PROC_SUPER_MAGIC 0x9fa0 /* statfs's f_type of /proc */
/* The directory `dirfd` (AT_FDCWD: the working directory) names, into
 * dir[size]: its length, or -1 when it is not /proc or inside it. */
HIDDEN long proc_dir_link(int dirfd, char *dir, size_t size);
/* Which directory of /proc `dirfd` is, by its link: one system call. */
enum { PROC_DIR_NONE, PROC_DIR_ROOT, PROC_DIR_PROCESS, PROC_DIR_TASKS,
       PROC_DIR_INSIDE /* any other directory inside /proc (fd, net, task/<tid>) */ };
HIDDEN int proc_dir_kind(int dirfd);
/* The relative path to hand the kernel under a directory of that kind:
 * `path`, or buf holding it with the system ids; NULL with errno set
 * (ENOENT: no such virtual id). */
HIDDEN const char *proc_at_path(int kind, const char *path, char buf[PATH_MAX]);
/* For a relative path with "." or ".." components (rel_dotted) under a
 * directory of /proc (`dirfd`, AT_FDCWD the working directory): the
 * directory's name (virtual ids) joined with it, made plain and rewritten
 * as an absolute path is (proc_path), in buf; `path` itself when the
 * directory is not in /proc, or is a process outside the application;
 * NULL with errno. `resolve`: openat2's flags, as for proc_path_resolve. */
HIDDEN const char *proc_at_join(int dirfd, const char *path, char buf[PATH_MAX], int resolve);
/* For a relative path that may reach /proc's numbers from a directory
 * outside /proc (rel_reaches_number): when the directory before the
 * number is our /proc (by device and inode), the same relative path with
 * the number (and what follows) rewritten as proc_path does, in buf;
 * `path` itself otherwise; NULL with errno (ENOENT: no such virtual id).
 * `in_proc`: dirfd is a directory of /proc (openat2 RESOLVE_BENEATH,
 * which refuses proc_at_join's absolute path): `path` itself when a
 * number comes before that directory (a virtual id there). */
HIDDEN const char *proc_rel_join(int dirfd, const char *path, char buf[PATH_MAX], int resolve, int in_proc);

/* --- Id helpers (preload_core.c) ----------------------------------------- */

/* Virtual -> system; 0 when the table has no such id. vid must be > 0. */
static inline int v2s_pid(pid_t vid, pid_t *sid) {
  int32_t s;
  if (!appshot_v2s(g_h, APPSHOT_PID, vid, &s)) return 0;
  *sid = s;
  return 1;
}
/* System -> virtual, 0 for a process outside the application (as a PID
 * namespace shows a parent that lives outside it). */
static inline pid_t s2v_or0(enum appshot_kind kind, int32_t sid) {
  int32_t v;
  return appshot_s2v(g_h, kind, sid, &v) ? v : 0;
}
/* A pid argument of the kill/getpgid kind: 0 stays 0 (the caller itself),
 * a negative one names a process group. Returns 0 and sets *sid, or an
 * errno for the caller to fail with. */
HIDDEN int pid_arg(pid_t vid, pid_t *sid, int err);
HIDDEN pid_t self_vpid(void);
/* preload_ipc.c: before an exec, the process marked if the kernel keeps
 * SEM_UNDO adjustments the next program's library cannot know. */
HIDDEN void sem_undo_before_exec(void);
HIDDEN pid_t self_vtid(void);
/* After fork or clone, in the child: our ids are those of the new process
 * (vid 0: not known yet, learned when first asked). */
HIDDEN void child_reset_ids(int32_t vid);
/* A fork child's: the restored late SIGCHLD (preload_pid.c) is its
 * parent's, whose pending signals it does not inherit. */
HIDDEN void late_sigchld_forget(void);
/* Whether this memory is shared with another process, which shares the
 * reaped ring too (preload_pid.c); child_reset_ids clears it. */
extern int g_reaped_shared HIDDEN;

/* --- Cross-file entry points (libc convention: -1 and errno) ------------- */

/* preload_pid.c */
HIDDEN void pid_atfork_child(void);
/* preload_mutex.c: in a fork child, whose one thread is none of those the
 * restore's TID moves name. */
HIDDEN void tid_moves_forget(void);
HIDDEN long do_kill(pid_t pid, int sig);
HIDDEN long do_tgkill(long nr, pid_t tgid, pid_t tid, int sig);
HIDDEN long do_wait4(pid_t pid, int *status, int options, struct rusage *ru);
HIDDEN long do_waitid(idtype_t idtype, id_t id, siginfo_t *info, int options,
                      struct rusage *ru);
HIDDEN long do_getppid(void);
HIDDEN long do_getpgid(pid_t pid);
HIDDEN long do_getsid(pid_t pid);
HIDDEN long do_setpgid(pid_t pid, pid_t pgid);
HIDDEN long do_setsid(void);
HIDDEN long ns_refused(unsigned long flags);
HIDDEN long do_setns(int fd, int nstype);
HIDDEN long do_clone_syscall(long flags, long stack, long ptid, long ctid, long tls);
HIDDEN long do_fork_syscall(void);
/* preload_syscall.c, Landlock: a child of this process was mapped (its
 * system PID), in the parent; a new process, in our code, right after its
 * fork or clone; a process's start (init, after every exec), its entry
 * mapped. Each marks what inherits a domain this process may be in. */
HIDDEN void landlock_note_child(int32_t child);
HIDDEN void landlock_fork_child(void);
HIDDEN void landlock_at_start(int32_t spid);
/* glibc's _Fork (2.34 on), or NULL: resolved at init, not when called
 * (dlsym is no call for a signal handler, where _Fork may be). */
extern void *real__Fork HIDDEN;
HIDDEN long do_clone3_syscall(long args, long size);
/* The clone and clone3 system calls, the child returning as from glibc's
 * syscall(): a bare `ret` on the stack it starts on (preload_pid.c). */
struct raw_clone_slot;
HIDDEN long raw_clone_on_stack(long flags, long stack, long ptid, long ctid, long tls, struct raw_clone_slot *slot);
HIDDEN long raw_clone3_on_stack(long args, long size, struct raw_clone_slot *slot);
HIDDEN long do_pid_first(long nr, long pid, long b, long c, long d, long e,
                         long f);
HIDDEN long do_prio(long nr, long which, long who, long prio);
HIDDEN long do_sigqueueinfo(long nr, pid_t tgid, pid_t tid, int sig,
                            siginfo_t *info);
struct __user_cap_header_struct;
HIDDEN long do_capget_set(long nr, struct __user_cap_header_struct *header,
                          void *data);
HIDDEN long do_ptrace(long request, pid_t pid, void *addr, void *data);
HIDDEN long do_kcmp(pid_t pid1, pid_t pid2, long type, long idx1, long idx2);
HIDDEN long do_ioprio(long nr, long which, long who, long ioprio);
HIDDEN long do_fcntl(int raw, int fd, int cmd, void *arg);
HIDDEN long do_rt_sigtimedwait(const sigset_t *set, siginfo_t *info,
                               const struct timespec *timeout, size_t size);
HIDDEN long do_perf_event_open(long attr, pid_t pid, long cpu, long group_fd,
                               unsigned long flags);
HIDDEN long do_prctl(long option, long a, long b, long c, long d);
HIDDEN long do_ioctl(int raw, int fd, unsigned long req, void *arg);

/* preload_ipc.c */
HIDDEN long do_ipc_get(enum appshot_kind kind, key_t key, long a, long b);
HIDDEN long do_semtimedop(int id, struct sembuf *ops, size_t n,
                          const struct timespec *timeout);
HIDDEN long do_semctl(int id, int num, int cmd, union semun arg);
HIDDEN long do_shmat(int id, const void *addr, int flags);
HIDDEN long do_shmctl(int id, int cmd, struct shmid_ds *buf);
HIDDEN long do_msgsnd(int id, const void *msg, size_t size, int flags);
HIDDEN long do_msgrcv(int id, void *msg, size_t size, long type, int flags);
HIDDEN long do_msgctl(int id, int cmd, struct msqid_ds *buf);
/* preload_view.c: what the application's own objects of `kind`
 * (APPSHOT_SHMID, _SEMID, _MSGID) add up to, read from /proc/sysvipc: how
 * many, and for segments the pages they take, resident and swapped
 * (shm_info's shm_tot, shm_rss, shm_swp), for sets their semaphores
 * (seminfo's semaem), for queues their messages and bytes (msginfo's
 * msgmap, msgtql). 1, or 0 when the file cannot be read or has not
 * those columns. */
struct sysv_usage {
  long objects;
  unsigned long long sum[3];
};
HIDDEN int sysv_usage(enum appshot_kind kind, struct sysv_usage *u);
/* A line of /proc/sysvipc/<kind> of system object `sid`: whether it is the
 * application's, and its virtual id, key and PIDs (npids of them). */
HIDDEN int ipc_view_line(enum appshot_kind kind, int32_t sid, int32_t *vid,
                         key_t *key, int32_t *pid, int npids);

/* preload_fd.c */
/* The tables for AID `aid`: through the inherited descriptor named by
 * fd_var (APPSHOT_TABLES_FD), else by path (APPSHOT_TABLES). NULL when
 * neither gives this application's tables. Sets *fd to the descriptor to
 * keep, or -1. */
HIDDEN struct appshot_header *tables_attach(const char *aid,
                                            const char *fd_var,
                                            const char *path, int *fd);
/* Before an exec or spawn: the descriptor must reach the new program even
 * if the program set close-on-exec on every descriptor it has. */
HIDDEN void tables_fd_keep_across_exec(void);
HIDDEN long do_close(int fd);
/* preload_signal.c: PIDs inside signal data. */
HIDDEN void translate_si_pid(siginfo_t *info);
HIDDEN long do_rt_sigaction(int sig, const void *act, void *old, size_t size);
/* Descriptors whose read() results hold system PIDs to translate:
 * signalfds (preload_signal.c) and message queues (preload_ipc.c). */
HIDDEN void translated_reads_forget(int fd);
HIDDEN void translated_reads_forget_range(unsigned int first, unsigned int last);
HIDDEN int translated_reads_marked(int fd);
HIDDEN void translated_reads_mark(int fd, int on);
/* preload_ipc.c: the text a read of a message queue returned (n bytes,
 * ending at the descriptor's offset now), its NOTIFY_PID made virtual. */
HIDDEN void mqueue_translate_read(int fd, char *buf, long n);
/* preload_pid.c: descriptors a dnotify watch was made through, whose
 * close ends it (and drops its note). */
HIDDEN int dnotify_marked(int fd);
HIDDEN void dnotify_copy(int from, int to);
HIDDEN void dnotify_closing(int fd);
HIDDEN void dnotify_closing_range(unsigned int first, unsigned int last);
/* Around an exec (preload_exec.c): the notes of watches its close-on-exec
 * closes go before it, and come back if it fails; in the new program, the
 * watched descriptors it inherited are marked again (init). */
#define DNOTIFY_EXEC_MAX APPSHOT_SOCKET_NOTES /* one note a directory */
struct dnotify_exec {
  int n;
  struct {
    int fd;
    int32_t mask;
    uint64_t ino;
  } w[DNOTIFY_EXEC_MAX];
};
HIDDEN void dnotify_exec_closing(struct dnotify_exec *x);
HIDDEN void dnotify_exec_failed(const struct dnotify_exec *x);
HIDDEN void dnotify_after_exec(void);
/* preload_fd.c: the marks above, carried by a copy of a descriptor. */
HIDDEN void fd_marks_copy(int from, int to);
HIDDEN long do_close_range(unsigned int first, unsigned int last, int flags);
HIDDEN long do_dup3(long nr, int oldfd, int newfd, int flags);

/* preload_net.c: getsockopt, sendmsg, sendmmsg, recvmsg and recvmmsg
 * through syscall(), peer credentials translated, unix names as the
 * wrappers take and answer them. */
HIDDEN long do_creds_syscall(long nr, long a, long b, long c, long d, long e);
/* setsockopt through syscall(): noted as setsockopt() notes (preload_net.c). */
HIDDEN long do_setsockopt_syscall(long fd, long level, long name, long val, long len);

/* preload_dents.c: getdents64 and getdents through syscall(), a listing
 * of /proc or /proc/<pid>/task made virtual. */
HIDDEN long do_getdents_syscall(long nr, long fd, long buf, long count);

/* preload_path.c: the calls that take a path (open, openat, openat2,
 * stat, lstat, newfstatat, statx, access, faccessat, faccessat2,
 * readlink, readlinkat, chdir) and fchdir through syscall(): the path the
 * wrappers would hand the kernel, and an open's translated view. */
HIDDEN long do_path_syscall(long nr, long a, long b, long c, long d, long e);

/* preload_exec.c */
HIDDEN void exec_capture_env(void);

/* preload_clock.c: clock_gettime, clock_getres, clock_settime,
 * clock_nanosleep and timer_create through syscall(), a CPU-time clock's
 * virtual id made the system's. */
HIDDEN long do_clock_syscall(long nr, long a, long b, long c, long d);
/* preload_cputime.c: the CPU time the process and its threads had before
 * a restore (appshot_cpu_times), added to the kernel's answers. The offset
 * for clock `clk` as the application names it (0 for most); an answer
 * made the application's; the copy a fork's child must not keep. */
HIDDEN int64_t cpu_clock_offset(clockid_t clk);
HIDDEN void cpu_clock_answer(clockid_t clk, struct timespec *ts);
/* Whether the kernel takes `ts` as a time (else its EINVAL is its own to
 * give: the application's value goes to it as it was). */
static inline int cpu_deadline_valid(const struct timespec *ts) {
  return ts->tv_sec >= 0 && ts->tv_nsec >= 0 && ts->tv_nsec < 1000000000L;
}
HIDDEN void cpu_times_forget(void);
/* The calling thread ends: its entry, if a restore gave it one, is
 * closed (a thread made later under its numbers is another). */
HIDDEN void cpu_thread_gone(void);
/* Whether the stat file of process `spid` (thread `stid`, or 0 for the
 * process's own), system ids as its descriptor's link names them, is the
 * caller's process's or one of its threads' after a restore: 1 with what
 * its utime, stime, cutime and cstime get added, in ns (preload_view.c). */
HIDDEN int cpu_stat_offsets(int32_t spid, int32_t stid, int64_t add[4]);
/* timer_settime with TIMER_ABSTIME: 1 with `out` the value whose deadline
 * is the kernel's count, when the timer is on one of these clocks. Call
 * only inside a window: it opens none of its own (inlined into a caller
 * that holds one, a second window would begin at the same stack pointer
 * and read as one a longjmp left, closing the caller's too). */
HIDDEN int cpu_timer_deadline(timer_t timerid, const struct itimerspec *value, struct itimerspec *out);

/* --- Paths (preload_path.c, preload_proc.c) ------------------------------
 *
 * Every path-taking wrapper hands the kernel path_slow(path) when
 * path_hooked(path), else the path as it is: /proc/<vpid>
 * rewritten to the system PID, then the instance's REDIR PATH and
 * copy-on-write rules applied. What the call will do with the path decides
 * which side of a copy-on-write rule it sees. */
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452 /* Linux 6.6; headers before it lack the name */
#endif
enum path_op {
  PATH_READ,   /* open O_RDONLY, stat, access, opendir, chdir, getxattr */
  PATH_WRITE,  /* an open that may write: copies a COW file up first */
  PATH_TRUNC,  /* the same, but the old contents are not needed (O_TRUNC) */
  PATH_CREATE, /* mkdir, open O_CREAT|O_EXCL, fopen "x": creates privately */
  PATH_REMOVE, /* unlink, rmdir, a rename's source */
  PATH_TARGET, /* a rename's destination: the private side */
  PATH_ATTR,   /* chmod, chown, utimes, setxattr, link's source: copies a COW
                * file, directory or node up first, following a symlink */
  PATH_LATTR,  /* the same for a call that does not follow a final symlink
                * (lchown, AT_SYMLINK_NOFOLLOW): a symlink is copied as one */
  PATH_OP_MASK = 15,
  /* Or'ed into PATH_READ, PATH_WRITE or PATH_TRUNC: the call does not
   * follow a final symlink (lstat, readlink, lgetxattr, O_NOFOLLOW,
   * AT_SYMLINK_NOFOLLOW). Without it, those and PATH_ATTR resolve a final
   * symlink under a rule themselves (path_slow), so that its target is
   * found as the clone sees it: a private copy, never the original to
   * write to, a relative target beside the link's own virtual name. */
  PATH_NOFOLLOW = 16,
  /* Or'ed into PATH_ATTR or PATH_LATTR: what the kernel would refuse, found
   * on the original before anything is copied up. PATH_OWNER: EPERM unless
   * the caller's fsuid owns the file or it has CAP_FOWNER (chmod, utimes
   * with explicit times); PATH_CHOWNER: the same with CAP_CHOWN (chown);
   * PATH_NOLINK: EOPNOTSUPP on a symlink (fchmodat AT_SYMLINK_NOFOLLOW,
   * lchmod); PATH_NODIR: EPERM on a directory (link's source). */
  PATH_OWNER = 32,
  PATH_CHOWNER = 64,
  PATH_NOLINK = 128,
  PATH_NODIR = 256,
  /* The arguments are ones the kernel (or glibc) refuses with EINVAL before
   * it looks the path up: path_slow fails so, copying nothing. */
  PATH_EINVAL = 512,
  /* openat2 with RESOLVE_IN_ROOT: the path is resolved inside dirfd, whose
   * /proc is not known to be ours; its numbers are left as they are
   * (review r388 M1). */
  PATH_INROOT = 1024,
  /* openat2's RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS and
   * RESOLVE_BENEATH (its bits 0x2, 0x4, 0x8, shifted): a rewrite of /proc
   * that stands for a link the kernel would follow (/dev/fd, self,
   * root, cwd, fd/<n>) must fail as the kernel's walk would (ELOOP,
   * EXDEV), not open what the link led to (review r432 N6). */
  PATH_RESOLVE_SHIFT = 11,
  PATH_RESOLVE = 0xe << PATH_RESOLVE_SHIFT,
};
/* openat2's resolve flags (linux/openat2.h), kept in an op. */
enum { RESOLVE_NO_MAGICLINKS_ = 0x02, RESOLVE_NO_SYMLINKS_ = 0x04, RESOLVE_BENEATH_ = 0x08 };
static inline int path_resolve(int op) {
  return (op & PATH_RESOLVE) >> PATH_RESOLVE_SHIFT;
}

/* preload_proc.c: "/proc/<vpid>..." with the system PID in buf, `path`
 * itself for every other path, NULL with errno (ENOENT) for a virtual PID
 * the application does not hold. */
HIDDEN const char *proc_path(const char *path, char buf[PATH_MAX]);
/* proc_path for openat2 with resolve flags (path_resolve: NO_SYMLINKS,
 * NO_MAGICLINKS, BENEATH): where the view would stand in for a link the
 * kernel follows, the kernel's walk to it is asked with those flags, and
 * its refusal is the answer (NULL with errno). */
HIDDEN const char *proc_path_resolve(const char *path, char buf[PATH_MAX], int resolve);
/* proc_path as the path rules read it: a ".." outside /proc by its letters
 * ("/tmp/../proc/<vpid>" is /proc/<vpid> to them), nothing looked up on the
 * real side (r388 H1). For matching only: what the kernel is handed when
 * no rule applies is proc_path's (r416 F3). */
HIDDEN const char *proc_path_letters(const char *path, char buf[PATH_MAX]);
/* In absolute `plain` (plain_path's), the last "/proc/..." whose directory
 * is "/" by the letters before it ("/tmp/../proc/self/root/x"), a pointer
 * into plain; NULL when there is none. */
HIDDEN const char *lexical_proc(const char *plain);
/* preload_proc.c: of "/proc/<vpid>/root/REST" (a process the tables know),
 * "/proc/self/root/REST" or "/proc/thread-self/root/REST", a pointer to
 * "/REST" inside path, with that process's root link (by system PID) in
 * `link`; NULL for any other path. Nothing looked up. */
#define PROC_ROOT_LINK 40
HIDDEN const char *proc_root_rest(const char *path, char link[PROC_ROOT_LINK]);
/* The kernel's answers in system ids made virtual, in place (preload_proc.c):
 * proc_answer_to_virtual rewrites "/proc/<spid>[/task/<stid>]..." at s
 * (len bytes, room for cap) and returns its new length, cut at cap;
 * proc_link_answer does it for readlink's answer `out` (n bytes of `size`)
 * of the link `path` relative to dirfd: a link of the kernel's to
 * "/proc/<spid>...", or /proc/self's or thread-self's "<spid>...". */
HIDDEN size_t proc_answer_to_virtual(char *s, size_t len, size_t cap);
HIDDEN long proc_link_answer(int dirfd, const char *path, char *out, long n, size_t size);

/* Whether the path must go through path_slow: an absolute path while the
 * instance has rules, or one under "/proc/". Relative paths are never
 * rewritten by the rules (nor, so, *at() calls with a directory fd and a
 * relative path): only what the application names absolutely (but see
 * proc_at_hooked). No tables, or no rules and no "/proc/" prefix: a few
 * loads and branches, and the wrapper calls the real function with
 * nothing of ours on its stack. */
/* Whether absolute `path` may name a file under /proc/<vpid>, which
 * proc_path rewrites: "/proc/...", and "//proc/<vpid>", "/./proc/<vpid>",
 * "/../proc/<vpid>" (any path starting "//" or "/."), "/tmp/../proc/<vpid>"
 * (a path with a ".." component, or a name starting "..", that has
 * "/proc/" too: two searches of a few nanoseconds; gcc's
 * ".../12/../../include/c++/12" is not one: r388 M2, L6), or a number
 * right after a "..", "cwd" or "fd/<n>", or after a "proc" component
 * anywhere ("/tmp/x/lnk/../../<vpid>", lnk a link to /dev/fd: r442 F1;
 * "/tmp/x/selflnk/cwd/<vpid>" with no "..": r456 F1; one more pass, for
 * paths abs_anchor_named only). The one test for
 * both the rewrite (path_slow) and the translation window it needs
 * (SLOW_PATH): a path rewritten outside the window would carry a system
 * PID across a snapshot. */
/* "/dev/fd/.." (/dev/fd being the system's link to /proc/self/fd):
 * "/dev/fd/../task/<vtid>", "/dev/fd/../../<vpid>" (r403 L6), of a plain
 * path (proc_path_unplain). Hooked by "/dev/" and "/fd/" with a ".."
 * ("/dev//fd/..", "/dev/./fd/..", "/dev/fd/./..": r416 F1; "//dev/fd/.."
 * by its "//"): not every "/fd/../" (a FIFO opened by such a name would
 * hold the translation window while it blocks). */
static inline int dev_fd_up(const char *path) {
  return !strncmp(path, "/dev/fd/..", 10) && (path[10] == '/' || !path[10]);
}
/* Whether absolute `path` (not "/proc/...") has a name after which
 * next_proc_anchor may find a number: "/..", "/proc/", "/cwd/" or "/fd/"
 * ("/tmp/x/lnk/cwd/<vpid>", lnk a link to /proc/self; "/tmp/x/devlnk/fd/3/
 * <vpid>", devlnk a link to /dev; "/tmp/x/rootlnk/proc/<vpid>", rootlnk a
 * link to "/": review r456 F1). A few short searches, no system call:
 * "/usr/lib/...", "/etc/passwd" are none of them. */
static inline int abs_anchor_named(const char *path) {
  return strstr(path, "/..") != NULL || strstr(path, "/proc/") != NULL || strstr(path, "/cwd/") != NULL || strstr(path, "/fd/") != NULL;
}
static inline int proc_path_may_name(const char *path) {
  return strncmp(path, "/proc/", 6) == 0 || UNLIKELY(path[1] == '/' || path[1] == '.') ||
         UNLIKELY(strstr(path, "/..") != NULL && (strstr(path, "/proc/") != NULL || (strstr(path, "/dev/") != NULL && strstr(path, "/fd/") != NULL))) ||
         UNLIKELY(abs_anchor_named(path) && rel_reaches_number(path)) ||
         UNLIKELY(path[1] == 'd' && proc_link_ahead(path)); /* "/dev/fd/<n>/.../<number>" (r432 N1) */
}
static inline int path_hooked(const char *path) {
  struct appshot_header *h = g_h;
  if (LIKELY(!h) || !path || path[0] != '/') return 0;
  return h->instance.redirs || proc_path_may_name(path);
}

/* Whether absolute `path` has a repeated slash, a "." or a ".."
 * component ("/proc//2/stat", "//proc/2", "/proc/./2", "/proc/self/../2"):
 * the kernel reads it as the plain path, which the /proc translations
 * must see too (review33 M2: "%s/%d/stat" with "/proc/" opened the
 * system's process 2; review34: "/proc/self/../2/stat" did). */
static inline int path_unplain(const char *path) {
  for (const char *s = path; *s; s++)
    if (s[0] == '/' && (s[1] == '/' || (s[1] == '.' && (s[2] == '/' || s[2] == '\0' ||
                                                         (s[2] == '.' && (s[3] == '/' || s[3] == '\0'))))))
      return 1;
  return 0;
}
/* `path` without its repeated slashes and "." components (but a last
 * one: what the kernel hands the call), into out, and
 * without the ".." components that are sound to take lexically: those
 * after a directory of /proc whose parent is known by its name
 * (/proc/<pid>, self, thread-self, task, task/<tid> and the plain
 * directories of a process or thread: fd, fdinfo, ns, net, attr,
 * map_files). Any other ".." (after a symbolic link such as
 * /proc/self/cwd or fd/<n>, /proc/sys, outside /proc) is kept with the
 * rest of the path, for the kernel to resolve, unless a directory of
 * /proc is followed by a number ("/proc/sys/../<vpid>/stat";
 * dotdot_resolved): the kernel would
 * read that number as a system id, so the directory before the ".." is
 * resolved by the kernel (opened, its link read: a few system calls, only
 * then) and the path goes on from its name. 1; 0 if it does not fit; -1
 * with errno when that directory cannot be opened (the whole path could
 * not be either). No system call otherwise. `letters`: the path rules'
 * reading, which keeps a ".." after a process's root for them to read by
 * its letters. `resolve`: openat2's flags (path_resolve), 0 for any other
 * call: a ".." taken by the name after a symbolic link of /proc's (self,
 * thread-self, net) is ELOOP under RESOLVE_NO_SYMLINKS, as the kernel's
 * walk to it, and a directory resolved is opened with them. */
HIDDEN int plain_path(const char *path, char out[PATH_MAX], int letters, int resolve);

/* The same for `path` relative to `dirfd` (AT_FDCWD for the calls without
 * one): path_hooked, or a virtual id under a directory of /proc. */
static inline int at_path_hooked(int dirfd, const char *path) {
  return UNLIKELY(path_hooked(path)) || UNLIKELY(proc_at_hooked(dirfd, path));
}

/* preload_path.c: the path to hand to the kernel for a hooked path: `path`
 * itself, or a pointer into buf holding the rewritten one; NULL with errno
 * set when the call must fail. Uses buf as its only large scratch space:
 * besides buf its frame holds a struct stat or two; resolving a symlink
 * (a final one, op without PATH_NOFOLLOW, or one in a middle component
 * under a copy-on-write rule) maps two pages for its target meanwhile. */
HIDDEN const char *path_slow(const char *path, int op, char buf[PATH_MAX]);
/* The same for a path relative to a directory of kind `kind`
 * (proc_dir_kind; PROC_DIR_NONE for an absolute one, or a directory
 * outside /proc: no system call then). */
HIDDEN const char *at_path_slow(int dirfd, int kind, const char *path, int op, char buf[PATH_MAX]);

/* preload_path.c, for preload_cowfd.c (metadata calls on a descriptor):
 *  - cow_fd_named: whether `name`, absolute (a descriptor's, as the
 *    kernel names it), is under a copy-on-write rule's `from` and not its
 *    private side; no system call.
 *  - cow_fd_private: the private side of `name` (in buf), made from the
 *    original as a metadata call `op` (PATH_ATTR or PATH_LATTR with its
 *    refusals) makes it, if it does not exist yet. 0 with *priv pointing
 *    into buf; 1 when the original under that name is not the inode of
 *    fd_st (renamed or replaced since: nothing made); or -errno.
 *  - the ops the path calls give chmod, chown and the utime family.
 *  - the path wrappers of the calls that may name a descriptor itself
 *    (AT_EMPTY_PATH, a NULL path), whose public names preload_cowfd.c
 *    defines. */
HIDDEN int cow_fd_named(const char *name);
HIDDEN int cow_fd_private(char buf[PATH_MAX], int op, const struct stat *fd_st, const char **priv);
HIDDEN int path_chmod_op(int flags);
HIDDEN int path_chown_op(int flags, uid_t uid, gid_t gid);
HIDDEN int path_utimens_op(const struct timespec *t, int flags);
HIDDEN int fchmodat_path(int fd, const char *path, mode_t mode, int flags);
HIDDEN int fchownat_path(int fd, const char *path, uid_t uid, gid_t gid, int flags);
HIDDEN int utimensat_path(int fd, const char *path, const struct timespec times[2], int flags);
HIDDEN int futimesat_path(int fd, const char *path, const struct timeval times[2]);
HIDDEN int linkat_path(int fd1, const char *from, int fd2, const char *to, int flags);
/* preload_cowfd.c: the same calls through syscall() (fchmod, fchown,
 * fsetxattr, fremovexattr; fchownat, fchmodat2, utimensat, futimesat and
 * linkat when they name the descriptor itself), or do_path_syscall. */
HIDDEN long do_cowfd_syscall(long nr, long a, long b, long c, long d, long e);
/* preload_path.c, for bind, sendto, sendmsg and sendmmsg (preload_net.c;
 * "Socket names"): an AF_UNIX address whose name is an absolute path the
 * path rules may rewrite (unix_name_hooked: a few compares, then, for a
 * length an AF_UNIX address may have (an AF_INET one's too),
 * unix_path_hooked, which reads it through read_in: no system call for
 * an address on the caller's stack next to the call, else two),
 * bound with the rewritten
 * name (unix_bind_slow: bind's return). unix_name_of: the name of the
 * caller's address, read through copy_in, terminated, into name; 1 when
 * it is an absolute path (0 for an unreadable address). unix_addr_of: the address of
 * name p into a; its length, or 0 (errno ENAMETOOLONG). */
#define UNIX_NAME_MAX ((socklen_t)sizeof(((struct sockaddr_un *)0)->sun_path))
HIDDEN int unix_path_hooked(const struct sockaddr *addr, socklen_t len);
/* Nothing of the caller's is read here: the address may be a bad pointer
 * (the kernel's EFAULT to answer), and is read by unix_path_hooked
 * through copy_in (review r250 L3). A length longer than a sockaddr_un is
 * the kernel's EINVAL for an AF_UNIX address (L4): it goes to the kernel
 * as it is, unread. */
static inline int unix_name_hooked(const struct sockaddr *addr, socklen_t len) {
  return g_h && addr && len > offsetof(struct sockaddr_un, sun_path) && len <= sizeof(struct sockaddr_un) &&
         unix_path_hooked(addr, len);
}
/* The same for the calls made once per packet (sendto, sendmsg,
 * sendmmsg), with the family read as it is: an AF_INET or AF_INET6
 * destination, a UDP server's every reply, then costs no system call
 * (read_in's copy_in is two for an address off the stack: 7 -> 15 us a
 * sendto on this project's VM); only an AF_UNIX one is read through it.
 * A destination pointer that cannot be read is a SIGSEGV here where the
 * kernel says EFAULT, as sendmsg's header already was. */
static inline int unix_dest_hooked(const struct sockaddr *addr, socklen_t len) {
  return g_h && addr && len > offsetof(struct sockaddr_un, sun_path) && len <= sizeof(struct sockaddr_un) &&
         addr->sa_family == AF_UNIX && unix_path_hooked(addr, len);
}
/* preload_pid.c: n bytes of the caller's memory at src into dst, read as
 * the kernel reads its arguments (process_vm_readv, one system call): 0;
 * -EFAULT when src does not hold them; another -errno when the system
 * refuses the copy (a seccomp filter). */
HIDDEN long copy_in(void *dst, const void *src, size_t n);
/* The same, with no system call when src lies in the calling thread's
 * stack pages next to the call (certainly mapped). */
HIDDEN long read_in(void *dst, const void *src, size_t n);
/* The room *lenp gives an answered name before the call (accept,
 * recvfrom, getpeername...): read only when an answered name may be
 * shown otherwise (rules: unix_answer_hooked), and then through copy_in;
 * 0 (nothing shown otherwise) for an unreadable one, whose call the
 * kernel fails with EFAULT. */
HIDDEN socklen_t unix_answer_room(const socklen_t *lenp);
static inline socklen_t answer_room(const void *addr, const socklen_t *lenp) {
  return g_h && g_h->instance.redirs && addr && lenp ? unix_answer_room(lenp) : 0;
}
HIDDEN int unix_bind_slow(int fd, const struct sockaddr *addr, socklen_t len);
HIDDEN int unix_name_of(const struct sockaddr *addr, socklen_t len, char name[UNIX_NAME_MAX + 1]);
HIDDEN socklen_t unix_addr_of(const char *p, struct sockaddr_un *a);
/* The name the kernel answered for a socket (getsockname, getpeername,
 * accept, recvfrom, recvmsg: `cap` the caller's room, *lenp the kernel's
 * length) as the application named it: a name under a rule's `to` back
 * to from + the rest. unix_answer_hooked: whether there may be one (an
 * answer cut short by the caller's buffer is left as it is). */
HIDDEN void unix_name_answered(struct sockaddr *addr, socklen_t cap, socklen_t *lenp);
static inline int unix_answer_hooked(const struct sockaddr *addr, socklen_t cap, const socklen_t *lenp) {
  return g_h && g_h->instance.redirs && addr && lenp && *lenp > offsetof(struct sockaddr_un, sun_path) &&
         *lenp <= cap && addr->sa_family == AF_UNIX && ((const char *)addr)[offsetof(struct sockaddr_un, sun_path)] == '/';
}

/* The slow half of a path wrapper lives in a function of its own, so that
 * the PATH_MAX buffer is only on the stack when a path is rewritten: some
 * of these calls are async-signal-safe, and crash handlers make them on
 * small alternate signal stacks. */
#define NOINLINE __attribute__((noinline))

/* In a slow half: declares `p`, the path to use for `path` relative to
 * `dirfd`, or returns `err`. A path under /proc/<vpid>, or relative to a
 * directory of /proc, holds a system PID from here to the call's return: a
 * translation window (see above) for the rest of the function (not for
 * other paths: a copy-on-write copy may take long, and an open of a FIFO
 * may block for good; neither holds an id). */
#define SLOW_PATH(p, dirfd, path, op, err)                                   \
  int p##_kind = (path)[0] == '/' ? PROC_DIR_NONE : proc_dir_kind(dirfd);   \
  ID_WINDOW_IF((path)[0] == '/' ? proc_path_may_name(path)                  \
                                 : (p##_kind != PROC_DIR_NONE && (p##_kind != PROC_DIR_INSIDE || rel_dotted(path) || link_before_number(path) || fd_link_before_number(path))) || \
                                       (p##_kind == PROC_DIR_NONE && rel_reaches_number(path))); \
  char p##_buf[PATH_MAX];                                                    \
  const char *p = at_path_slow((dirfd), p##_kind, (path), (op), p##_buf);    \
  if (!p) return err

#endif
