/*
 * Clocks that name a process or a thread: the CPU-time clocks of
 * clock_getcpuclockid and pthread_getcpuclockid, and every call that takes
 * a clock id (clock_gettime, clock_getres, clock_settime, clock_nanosleep,
 * timer_create).
 *
 * The kernel encodes a CPU-time clock in a negative clock id:
 * ~id << 3, a per-thread bit (4) and which count (PROF 0, VIRT 1, SCHED 2);
 * id 0 is the caller. The low bits 3 are no CPU clock but a dynamic
 * clock's file descriptor (FD_TO_CLOCKID, a PTP device): no id in it.
 *
 * The application only ever holds clock ids that encode *virtual* ids: the
 * two functions that make such a clock encode the virtual PID or TID, and
 * each call that hands a clock to the kernel translates it there, virtual
 * to system, at that moment. Translating at use rather than at making is
 * what survives a snapshot: a program keeps its clock id in memory, and
 * after a restore the virtual id inside it still names the same process,
 * now under another system PID, which the next call looks up afresh. A
 * clock that encoded the system PID would name, after the restore,
 * whatever has that number on the new node. (glibc makes these clocks by
 * arithmetic, with no system call to intercept, and pthread_getcpuclockid
 * encodes the system TID glibc caches: both are wrapped for that reason.)
 *
 * clock_gettime is the hot one (the vDSO makes it a few nanoseconds): the
 * ordinary clocks go straight to glibc's after one compare; only a
 * negative clock, or the process's or thread's CPU-time clock, whose
 * answer gets the CPU time it had before a restore (preload_cputime.c),
 * takes the slow path. Those the vDSO does not serve: a system call
 * anyway.
 *
 * Not covered: clock ids made by arithmetic on a PID and handed to the
 * kernel by a raw syscall instruction (outside any library), as for every
 * other id; clock_adjtime, which the kernel refuses for every CPU clock
 * whatever its id (EOPNOTSUPP) and so cannot tell one process from another.
 */
#include "preload.h"

#include <pthread.h>
#include <time.h>

#define CPUCLOCK_WHICH_MASK 3
#define CPUCLOCK_FD 3 /* the low bits of a dynamic clock's id */
#define CPUCLOCK_PERTHREAD 4
#define CPUCLOCK_LOW_MASK 7
#define CPUCLOCK_SCHED 2

/* The process or thread id inside a CPU-time clock (which is negative). */
static inline int32_t cpuclock_id(clockid_t clk) { return ~(clk >> 3); }
static inline clockid_t cpuclock_make(int32_t id, clockid_t low) {
  return (clockid_t)(((uint32_t)~id << 3) | (uint32_t)low);
}

/* The clock to hand the kernel for the application's `clk`: itself unless
 * it is a CPU-time clock of a process or thread other than the caller,
 * whose virtual id is made this node's. 0, or EINVAL for a virtual id the
 * application does not hold (what the kernel says of a clock of a process
 * that does not exist). Called with the tables attached and clk < 0. */
static int clock_v2s(clockid_t clk, clockid_t *sys_clk) {
  *sys_clk = clk;
  if ((clk & CPUCLOCK_WHICH_MASK) == CPUCLOCK_FD) return 0;
  int32_t vid = cpuclock_id(clk);
  if (vid == 0) return 0;
  pid_t sid;
  if (!v2s_pid(vid, &sid)) return EINVAL;
  *sys_clk = cpuclock_make(sid, clk & CPUCLOCK_LOW_MASK);
  return 0;
}

/* Whether `clk` is negative (an id inside), CLOCK_PROCESS_CPUTIME_ID or
 * CLOCK_THREAD_CPUTIME_ID: in one compare, as `clk ^ 2` maps 2 and 3 to 0
 * and 1 and the negative ones to the top half, and less 2 puts all of
 * those at 0x7ffffffe and above. */
static inline int clock_cpu_or_id(clockid_t clk) {
  return (uint32_t)(((uint32_t)clk ^ 2u) - 2u) >= 0x7ffffffeu;
}

/* Whether `clk` may need translating: negative, with the tables there. */
static inline int clock_hooked(clockid_t clk) {
  if (LIKELY(clk >= 0)) return 0;
  ensure_init();
  return g_h != NULL;
}

/* --- Making a clock ------------------------------------------------------ */

/* glibc's arithmetic, with a check that the process exists; the clock
 * encodes the virtual PID. Returns an error number, as the function does. */
API int clock_getcpuclockid(pid_t pid, clockid_t *clock_id) {
  ensure_init();
  clockid_t clk = cpuclock_make(pid, CPUCLOCK_SCHED);
  if (g_h && pid != 0) {
    ID_WINDOW();
    clockid_t sys_clk;
    if (pid < 0 || clock_v2s(clk, &sys_clk)) return ESRCH;
    long r = SYS2(clock_getres, sys_clk, NULL);
    if (r < 0) return r == -EINVAL ? ESRCH : (int)-r;
  } else {
    long r = SYS2(clock_getres, clk, NULL);
    if (r < 0) return r == -EINVAL ? ESRCH : (int)-r;
  }
  *clock_id = clk;
  return 0;
}

/* glibc encodes the thread's system TID (its descriptor's); the
 * application gets its virtual TID instead. A thread that never asked for
 * its own TID is not in the table yet: mapped here, as gettid() in it
 * would (the snapshot maps such threads the same way). */
API int pthread_getcpuclockid(pthread_t thread, clockid_t *clock_id) {
  ensure_init();
  int (*real)(pthread_t, clockid_t *) = REAL(pthread_getcpuclockid);
  if (!real) return ENOSYS;
  if (!g_h) return real(thread, clock_id);
  ID_WINDOW();
  clockid_t sys_clk;
  int e = real(thread, &sys_clk);
  if (e) return e;
  int32_t stid = cpuclock_id(sys_clk);
  /* 0: a thread that has exited (the kernel cleared its TID); the clock is
   * then the caller's own, as glibc gives it. */
  if (stid == 0) {
    *clock_id = sys_clk;
    return 0;
  }
  int32_t vtid;
  if (!appshot_s2v(g_h, APPSHOT_PID, stid, &vtid)) {
    pid_t spid = (pid_t)SYS0(getpid);
    vtid = appshot_map_system(g_h, APPSHOT_PID, stid, APPSHOT_F_THREAD, spid);
    if (vtid < 0) return EAGAIN; /* table full: no virtual id to give */
    appshot_set_flags(g_h, APPSHOT_PID, spid, APPSHOT_F_THREADS);
  }
  *clock_id = cpuclock_make(vtid, sys_clk & CPUCLOCK_LOW_MASK);
  return 0;
}

/* --- Using a clock ------------------------------------------------------- */

/* The slow halves: a negative clock, or a call before init. From the
 * translation to the kernel's answer a system id is in hand: a translation
 * window. */
static NOINLINE int clock_gettime_slow(clockid_t clk, struct timespec *ts) {
  int (*real)(clockid_t, struct timespec *) = REAL(clock_gettime);
  /* A window for the CPU-time clocks too: from the kernel's answer until
   * the offset is added, the time in hand is this node's count, which a
   * restore's offsets are not for (preload_cputime.c). */
  ID_WINDOW();
  int r;
  if (!clock_hooked(clk)) {
    r = real ? real(clk, ts) : (int)libc_ret(SYS2(clock_gettime, clk, ts));
  } else {
    clockid_t sys_clk;
    int e = clock_v2s(clk, &sys_clk);
    if (e) return (int)fail(e);
    r = real ? real(sys_clk, ts) : (int)libc_ret(SYS2(clock_gettime, sys_clk, ts));
  }
  if (r == 0) {
    test_pause("cpu-clock-answered"); /* the kernel's count, not the application's yet */
    cpu_clock_answer(clk, ts);
  }
  return r;
}

API int clock_gettime(clockid_t clk, struct timespec *ts) {
  int (*real)(clockid_t, struct timespec *) = REAL(clock_gettime);
  if (LIKELY(!clock_cpu_or_id(clk) && real)) return real(clk, ts);
  return clock_gettime_slow(clk, ts);
}

/* The others are not hot: translated, then the bare call (glibc's adds
 * only 32-bit time conversions, which x86-64 does not need). NOINLINE:
 * do_clock_syscall calls it inside its own window, which an inlined copy's
 * would close (a window in the same frame; preload.h). */
static NOINLINE long clock_call(long nr, clockid_t clk, long b, long c, long d) {
  if (!clock_hooked(clk)) return libc_ret(appshot_raw_syscall(nr, clk, b, c, d, 0, 0));
  ID_WINDOW();
  clockid_t sys_clk;
  int e = clock_v2s(clk, &sys_clk);
  if (e) return fail(e);
  return libc_ret(appshot_raw_syscall(nr, sys_clk, b, c, d, 0, 0));
}

API int clock_getres(clockid_t clk, struct timespec *res) {
  return (int)clock_call(SYS_clock_getres, clk, (long)res, 0, 0);
}

API int clock_settime(clockid_t clk, const struct timespec *ts) {
  return (int)clock_call(SYS_clock_settime, clk, (long)ts, 0, 0);
}

/* The sleep itself, the clock translated: through glibc's (`glibc`: its
 * rules first, the thread's own CPU clock cannot be slept on, the
 * process's is the caller's process clock; a cancellation point, for a
 * clock that needs no translating too, so that it stays one for the
 * ordinary clocks), else the bare call (syscall(): the kernel's rules).
 * Returns an error number, not -1. */
static int clock_sleep(clockid_t clk, int flags, const struct timespec *req,
                       struct timespec *rem, int glibc) {
  int (*real)(clockid_t, int, const struct timespec *, struct timespec *) =
      glibc ? REAL(clock_nanosleep) : NULL;
  if (LIKELY(clk >= 0 || !g_h)) {
    if (real) return real(clk, flags, req, rem);
    long r = SYS4(clock_nanosleep, clk, flags, req, rem);
    return r < 0 ? (int)-r : 0;
  }
  ID_WINDOW();
  clockid_t sys_clk;
  int e = clock_v2s(clk, &sys_clk);
  if (e) return e;
  if (real) return real(sys_clk, flags, req, rem);
  long r = SYS4(clock_nanosleep, sys_clk, flags, req, rem);
  return r < 0 ? (int)-r : 0;
}

/* Whether `clk` is a CPU-time clock: the process's, the thread's, or a
 * negative one that is no dynamic clock's descriptor. */
static inline int clock_is_cpu(clockid_t clk) {
  return clk == CLOCK_PROCESS_CPUTIME_ID || clk == CLOCK_THREAD_CPUTIME_ID ||
         (clk < 0 && (clk & CPUCLOCK_WHICH_MASK) != CPUCLOCK_FD);
}

/* An absolute sleep on a CPU-time clock until `req` as the application
 * counts it (the kernel's count and a restore's offset,
 * preload_cputime.c), slept as relative sleeps for what is left, until
 * the clock read so has reached it. Never the kernel's absolute sleep:
 * its deadline would be a time of this node's count, and a sleep
 * snapshotted blocked is restarted as it was called (ERESTARTNOHAND), or
 * made by a thread caught between the translation and the call:
 * restored, the process's count starts again near 0, and the sleep
 * waited, past the application's deadline, for all the CPU time the
 * process had used before (for good, in a process that uses no more).
 * A relative sleep's time left is what the restore makes again
 * (src/resources/threads.ts), whatever the count. It may end late by the
 * CPU time the process uses between the read and the kernel's start of
 * the sleep, far less than the tick at which the kernel looks at CPU-time
 * timers. A deadline the kernel refuses, or a clock that cannot be read,
 * goes to the kernel as it was, for its own error. errno is kept. */
static int cpu_sleep_until(clockid_t clk, const struct timespec *req, int glibc) {
  /* 292 years or more: no count gets there, the kernel's as far either. */
  if (req->tv_sec >= INT64_MAX / 1000000000LL) return clock_sleep(clk, TIMER_ABSTIME, req, NULL, glibc);
  int saved = errno;
  int64_t until = (int64_t)req->tv_sec * 1000000000LL + req->tv_nsec;
  for (int slept = 0;; slept = 1) {
    struct timespec now, rel = {0, 0}, left;
    if (clock_gettime_slow(clk, &now) != 0) {
      errno = saved;
      return clock_sleep(clk, TIMER_ABSTIME, req, NULL, glibc);
    }
    int64_t d = until - ((int64_t)now.tv_sec * 1000000000LL + now.tv_nsec);
    /* Reached: at once, but through the kernel the first time, for what
     * it refuses whatever the time (the caller's own thread's clock). */
    if (d <= 0 && slept) return 0;
    if (d > 0) rel.tv_sec = d / 1000000000LL, rel.tv_nsec = d % 1000000000LL;
    test_pause("cpu-deadline-made"); /* what is left, a duration: any count's */
    int e = clock_sleep(clk, 0, &rel, &left, glibc);
    if (e || d <= 0) return e;
  }
}

/* A cancellation point in glibc, kept one through glibc's own. Returns an
 * error number, not -1. A relative sleep always has a `rem` (ours where
 * the program gave none), as nanosleep's (preload_wait.c): the kernel
 * writes the time left there when a stop interrupts it, and a restore
 * sleeps for that, not the whole request again. */
API int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req,
                        struct timespec *rem) {
  struct timespec left;
  if (!rem && !(flags & TIMER_ABSTIME)) rem = &left;
  ensure_init();
  if (UNLIKELY(flags & TIMER_ABSTIME) && req && clock_is_cpu(clk) && cpu_deadline_valid(req))
    return cpu_sleep_until(clk, req, 1);
  return clock_sleep(clk, flags, req, rem, 1);
}

/* A sigevent's target thread (SIGEV_THREAD_ID; sigev_notify_thread_id,
 * which this glibc's headers call _sigev_un._tid) is a TID too: the
 * application's virtual one made the system's, in a copy. */
#ifndef SIGEV_THREAD_ID
#define SIGEV_THREAD_ID 4
#endif

/* Translates the clock and, in *copy, the target thread; *evp is
 * repointed at the copy when the thread was translated. 0 or an errno. */
static int timer_args(clockid_t clk, clockid_t *sys_clk, struct sigevent **evp,
                      struct sigevent *copy) {
  int e = clk < 0 ? clock_v2s(clk, sys_clk) : (*sys_clk = clk, 0);
  if (e) return e;
  struct sigevent *ev = *evp;
  if (ev && (ev->sigev_notify & SIGEV_THREAD_ID) && ev->_sigev_un._tid > 0) {
    *copy = *ev;
    if (!v2s_pid(ev->_sigev_un._tid, &copy->_sigev_un._tid)) return EINVAL;
    *evp = copy;
  }
  return 0;
}

/* Through glibc's, which makes SIGEV_THREAD's helper thread. */
/* timer_create@GLIBC_2.3.3, librt's before glibc 2.34 moved it into libc,
 * is the same function under its older version: programs linked before
 * 2.34 reach the same wrapper. */
API SYMVER("timer_create@@GLIBC_2.34") SYMVER("timer_create@GLIBC_2.3.3")
int appshot_current_timer_create(clockid_t clk, struct sigevent *evp, timer_t *timerid) {
  ensure_init();
  int (*real)(clockid_t, struct sigevent *, timer_t *) = REAL(timer_create);
  if (!real) return (int)fail(ENOSYS);
  if (!g_h) return real(clk, evp, timerid);
  ID_WINDOW();
  clockid_t sys_clk;
  struct sigevent copy;
  int e = timer_args(clk, &sys_clk, &evp, &copy);
  if (e) return (int)fail(e);
  return real(sys_clk, evp, timerid);
}

/* An absolute time on a CPU-time clock, as the application counts it,
 * made the kernel's (preload_cputime.c). The same ABI under both
 * versions; timer_settime@GLIBC_2.2.5 (the index timers of
 * timer_create@GLIBC_2.2.5) is left to glibc. */
API SYMVER("timer_settime@@GLIBC_2.34") SYMVER("timer_settime@GLIBC_2.3.3")
int appshot_current_timer_settime(timer_t timerid, int flags, const struct itimerspec *value,
                                  struct itimerspec *old) {
  ensure_init();
  int (*real)(timer_t, int, const struct itimerspec *, struct itimerspec *) = REAL(timer_settime);
  if (!real) return (int)fail(ENOSYS);
  struct itimerspec kernel_value;
  /* From the translation to the call, the deadline is a time of this
   * node's count (the application's own where there is no offset yet): a
   * window, as for an id (a snapshot lets the thread make the call first;
   * the restore carries the timer's time left). It covers
   * cpu_timer_deadline too, which opens none of its own: inlined here, one
   * would begin at this frame's stack pointer and close this one. */
  ID_WINDOW_IF(flags & TIMER_ABSTIME);
  if (UNLIKELY(flags & TIMER_ABSTIME) && value) {
    if (cpu_timer_deadline(timerid, value, &kernel_value)) value = &kernel_value;
    test_pause("abstime-timer-made");
  }
  return real(timerid, flags, value, old);
}

/* timer_create@GLIBC_2.2.5: the ABI before glibc 2.3.3, whose timer id is
 * an index into glibc's own table of timers, which that version's
 * timer_settime, timer_gettime... take. Its clock and target thread are
 * translated as the current one's, then glibc's function of the same
 * version makes the timer (the current one's id would be no index). */
COMPAT_VERSION("timer_create@GLIBC_2.2.5")
int appshot_compat_timer_create_2_2_5(clockid_t clk, struct sigevent *evp, int *timerid) {
  ensure_init();
  int (*real)(clockid_t, struct sigevent *, int *) =
      (int (*)(clockid_t, struct sigevent *, int *))real_fn[R_timer_create_2_2_5];
  if (!real) return (int)fail(ENOSYS);
  if (!g_h) return real(clk, evp, timerid);
  ID_WINDOW();
  clockid_t sys_clk;
  struct sigevent copy;
  int e = timer_args(clk, &sys_clk, &evp, &copy);
  if (e) return (int)fail(e);
  return real(sys_clk, evp, timerid);
}

/* syscall(): the kernel's conventions (timer_create writes the kernel's
 * timer id, clock_nanosleep returns -1 and errno here). */
long do_clock_syscall(long nr, long a, long b, long c, long d) {
  if (nr == SYS_clock_gettime) {
    ID_WINDOW(); /* the kernel's count until the offset is added */
    long r = clock_call(nr, (clockid_t)a, b, c, d);
    if (r == 0) cpu_clock_answer((clockid_t)a, (struct timespec *)b);
    return r;
  }
  if (nr == SYS_clock_nanosleep && (b & TIMER_ABSTIME) && c && clock_is_cpu((clockid_t)a) &&
      cpu_deadline_valid((const struct timespec *)c)) {
    int e = cpu_sleep_until((clockid_t)a, (const struct timespec *)c, 0);
    return e ? fail(e) : 0;
  }
  if (nr == SYS_timer_create) {
    ID_WINDOW();
    clockid_t sys_clk;
    struct sigevent *ev = (struct sigevent *)b, copy;
    int e = timer_args((clockid_t)a, &sys_clk, &ev, &copy);
    if (e) return fail(e);
    return libc_ret(SYS3(timer_create, sys_clk, ev, c));
  }
  return clock_call(nr, (clockid_t)a, b, c, d);
}
