/*
 * The CPU time a process and its threads had used before a restore.
 *
 * The kernel counts a task's CPU time from when the task was made, and no
 * call sets it: a restored process's clocks start again near 0. A program
 * that reads its CPU time before and after a snapshot would see it go
 * backwards. So a restore writes, into this library's memory in the
 * restored process (appshot_cpu_times, src/resources/cputime.ts), what
 * each count had reached at the snapshot less what the kernel counts at
 * the restore, and the calls that answer a CPU time add it:
 *
 *  - the process's: CLOCK_PROCESS_CPUTIME_ID (and its own clock made by
 *    clock_getcpuclockid), clock(), getrusage(RUSAGE_SELF), times()'s
 *    tms_utime and tms_stime;
 *  - its reaped children's: getrusage(RUSAGE_CHILDREN), times()'s
 *    tms_cutime and tms_cstime;
 *  - each thread's: CLOCK_THREAD_CPUTIME_ID, getrusage(RUSAGE_THREAD),
 *    and a thread's clock from pthread_getcpuclockid, by the virtual TID
 *    inside it (a thread of this process);
 *  - an absolute timer_settime on one of these clocks is set on the
 *    kernel's count, the offset taken off; an absolute clock_nanosleep
 *    sleeps for what is left by the application's count
 *    (preload_clock.c, cpu_sleep_until).
 *
 * From the kernel's answer until its offset is added, and from a deadline
 * made the kernel's until the call takes it, the time in hand is a count
 * of this node's process, which the offsets of a restore are not for:
 * each is a translation window (preload.h), as for an id. A snapshot lets
 * a thread stopped there run out of it first; caught there and restored,
 * the thread added the new process's offset to the old one's count (a
 * time as far ahead as all the CPU time the process had used, and the
 * next read went backwards), or slept until a time of the old count.
 *
 * A process that never was restored has all zero: the calls add nothing
 * (one load and a branch after the kernel's answer). A fork's child
 * starts its own count: its copy is zeroed (cpu_times_forget); an exec
 * starts a new program with none, as it starts with its own memory.
 *
 * Each value is whole nanoseconds, an int64 (negative when the restore
 * itself used more than the process had before). The layout is read and
 * written by the snapshot and the restore (CPU_TIMES in
 * src/resources/cputime.ts): fields are only ever added at the end.
 *
 * A thread's entry is its restored thread's only. A thread made since
 * may be given the virtual TID of one that ended (the tables hand out
 * the first free number after a restore), and the kernel may give it the
 * system TID too (pid_max is often 32768): neither says it is the thread
 * the entry was written for. So the restore also writes, into each
 * restored thread's own memory (t_cpu_entry, its thread-local storage,
 * at its thread pointer plus appshot_cpu_entry_tpoff), which entry is
 * its own; a thread made since starts with 0 there (glibc sets up every
 * new thread's thread-local storage afresh, a reused stack's too). A
 * thread's own counts take its entry by that: no search, and nothing of
 * another thread's. Another thread's clock, or its task stat, is looked
 * up by virtual TID (entries sorted by it: a binary search) and taken
 * only if the system TID the restore gave that thread is the one the
 * virtual TID names now; the entry is closed when its thread ends
 * through pthread_exit or a return, if it had asked its own TID (the
 * library's thread key, whose destructor calls cpu_thread_gone, is set
 * then).
 */
#include "preload.h"

#include <sys/resource.h>
#include <sys/times.h>

/* Threads with an entry at most. A fixed table in the library's .bss:
 * its pages cost nothing until a restore writes them (a header and one
 * 32-byte entry per thread), and a process's own lookups take their entry
 * by index. */
#define CPU_THREADS 4096
#define NS_PER_TICK 10000000LL /* USER_HZ, 100 on every Linux ABI */

struct appshot_cpu_thread {
  int32_t vtid; /* the entries in use are sorted by it */
  int32_t tid;  /* the system TID the restore gave the thread; 0: the
                   thread has ended (its entry closed) */
  int64_t ns, user_ns, system_ns;
};

struct appshot_cpu_times {
  int32_t owner;                 /* the virtual PID a restore wrote these
                                    for; 0: none */
  uint32_t threads;              /* entries of thread[] in use */
  int64_t process_ns;            /* the process's clock, all threads */
  int64_t user_ns, system_ns;    /* its rusage split */
  int64_t child_user_ns, child_system_ns; /* its reaped children's */
  struct appshot_cpu_thread thread[CPU_THREADS];
};
_Static_assert(sizeof(struct appshot_cpu_thread) == 32, "CPU_TIMES.entry in cputime.ts");
_Static_assert(offsetof(struct appshot_cpu_times, thread) == 48, "CPU_TIMES.entries in cputime.ts");

struct appshot_cpu_times appshot_cpu_times API;

/* This thread's entry of thread[], plus one; 0: none (a thread made since
 * the restore, or one the restore gave none). Written by the restore only,
 * at the thread pointer plus appshot_cpu_entry_tpoff. */
static __thread uint32_t t_cpu_entry TLS_IE;
long appshot_cpu_entry_tpoff API;

__attribute__((constructor)) static void cpu_entry_publish(void) {
  char *tp;
  __asm__("mov %%fs:0, %0" : "=r"(tp));
  appshot_cpu_entry_tpoff = (long)((char *)&t_cpu_entry - tp);
}

/* Whether a restore gave this process its offsets: a fork's child that
 * no wrapper of ours saw keeps its parent's copy, which is not its own. */
static inline int cpu_times_set(void) {
  int32_t owner = __atomic_load_n(&appshot_cpu_times.owner, __ATOMIC_RELAXED);
  return UNLIKELY(owner != 0) && g_h && owner == self_vpid();
}

void cpu_times_forget(void) {
  /* Written only when set: a page written here is a copy-on-write fault
   * in every fork's child. The header alone: every reader goes by the
   * owner and the count (the entries' pages are left untouched). */
  if (__atomic_load_n(&appshot_cpu_times.owner, __ATOMIC_RELAXED)) {
    __atomic_store_n(&appshot_cpu_times.threads, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&appshot_cpu_times.owner, 0, __ATOMIC_RELAXED);
  }
}

static inline uint32_t cpu_threads_in_use(void) {
  uint32_t n = __atomic_load_n(&appshot_cpu_times.threads, __ATOMIC_RELAXED);
  return n > CPU_THREADS ? CPU_THREADS : n;
}

void cpu_thread_gone(void) {
  uint32_t i = t_cpu_entry;
  if (!i) return;
  t_cpu_entry = 0;
  if (i <= cpu_threads_in_use())
    __atomic_store_n(&appshot_cpu_times.thread[i - 1].tid, 0, __ATOMIC_RELAXED);
}

/* The entry of virtual thread `vtid`, whose system TID is `tid` now, or
 * NULL. */
static const struct appshot_cpu_thread *cpu_thread(int32_t vtid, int32_t tid) {
  uint32_t lo = 0, hi = cpu_threads_in_use();
  while (lo < hi) {
    uint32_t mid = lo + (hi - lo) / 2;
    int32_t v = appshot_cpu_times.thread[mid].vtid;
    if (v == vtid) {
      const struct appshot_cpu_thread *t = &appshot_cpu_times.thread[mid];
      return tid && __atomic_load_n(&t->tid, __ATOMIC_RELAXED) == tid ? t : NULL;
    }
    if (v < vtid) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}

/* Another thread's entry by its virtual TID. */
static const struct appshot_cpu_thread *vthread_entry(int32_t vtid) {
  pid_t sid;
  return v2s_pid(vtid, &sid) ? cpu_thread(vtid, sid) : NULL;
}

static const struct appshot_cpu_thread *own_cpu_thread(void) {
  uint32_t i = t_cpu_entry;
  if (!i || i > cpu_threads_in_use()) return NULL;
  const struct appshot_cpu_thread *t = &appshot_cpu_times.thread[i - 1];
  return __atomic_load_n(&t->tid, __ATOMIC_RELAXED) ? t : NULL;
}

#define CPUCLOCK_WHICH_MASK 3
#define CPUCLOCK_PROF 0
#define CPUCLOCK_VIRT 1
#define CPUCLOCK_FD 3
#define CPUCLOCK_PERTHREAD 4

/* What to add to the kernel's reading of clock `clk` as the application
 * names it (its virtual ids): CLOCK_PROCESS_CPUTIME_ID,
 * CLOCK_THREAD_CPUTIME_ID, or a CPU-time clock of this process or of one
 * of its threads; 0 for every other clock (another process's: its offsets
 * are in its own memory). PROF counts user and system time, VIRT user
 * time, SCHED (the clock_gettime ones) the scheduler's runtime. */
int64_t cpu_clock_offset(clockid_t clk) {
  if (!cpu_times_set()) return 0;
  if (clk == CLOCK_PROCESS_CPUTIME_ID) return appshot_cpu_times.process_ns;
  const struct appshot_cpu_thread *t = NULL;
  int which = 2;
  if (clk == CLOCK_THREAD_CPUTIME_ID) {
    t = own_cpu_thread();
  } else {
    if (clk >= 0 || (clk & CPUCLOCK_WHICH_MASK) == CPUCLOCK_FD) return 0;
    which = clk & CPUCLOCK_WHICH_MASK;
    int32_t vid = ~(clk >> 3);
    if (clk & CPUCLOCK_PERTHREAD) {
      t = vid == 0 || vid == self_vtid() ? own_cpu_thread() : vthread_entry(vid);
    } else {
      if (vid != 0 && vid != self_vpid()) return 0;
      if (which == CPUCLOCK_VIRT) return appshot_cpu_times.user_ns;
      if (which == CPUCLOCK_PROF) return appshot_cpu_times.user_ns + appshot_cpu_times.system_ns;
      return appshot_cpu_times.process_ns;
    }
  }
  if (!t) return 0;
  if (which == CPUCLOCK_VIRT) return t->user_ns;
  if (which == CPUCLOCK_PROF) return t->user_ns + t->system_ns;
  return t->ns;
}

/* `ts` (a valid time: the kernel's answer, or a deadline checked by
 * cpu_deadline_valid) moved by `ns`, at least 0 and without overflow: one
 * past 292 years, which the kernel takes as its farthest time, is left
 * as it is (as far for it either way). */
static void timespec_add(struct timespec *ts, int64_t ns) {
  if (ts->tv_sec > INT64_MAX / 1000000000LL - 1) return;
  int64_t v = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
  if (__builtin_add_overflow(v, ns, &v)) v = ns < 0 ? 0 : INT64_MAX;
  if (v < 0) v = 0;
  ts->tv_sec = v / 1000000000LL;
  ts->tv_nsec = v % 1000000000LL;
}

void cpu_clock_answer(clockid_t clk, struct timespec *ts) {
  int64_t off = cpu_clock_offset(clk);
  if (UNLIKELY(off != 0) && ts) timespec_add(ts, off);
}

static void timeval_add(struct timeval *tv, int64_t ns) {
  int64_t v = (int64_t)tv->tv_sec * 1000000LL + tv->tv_usec + ns / 1000;
  if (v < 0) v = 0;
  tv->tv_sec = v / 1000000LL;
  tv->tv_usec = v % 1000000LL;
}

API int getrusage(int who, struct rusage *usage) {
  ID_WINDOW(); /* the kernel's counts until the offsets are added */
  long r = SYS2(getrusage, who, usage);
  if (r < 0) return (int)libc_ret(r);
  if (LIKELY(!cpu_times_set())) return 0;
  int64_t u = 0, s = 0;
  if (who == RUSAGE_SELF) {
    u = appshot_cpu_times.user_ns;
    s = appshot_cpu_times.system_ns;
  } else if (who == RUSAGE_CHILDREN) {
    u = appshot_cpu_times.child_user_ns;
    s = appshot_cpu_times.child_system_ns;
  } else if (who == RUSAGE_THREAD) {
    const struct appshot_cpu_thread *t = own_cpu_thread();
    if (t) u = t->user_ns, s = t->system_ns;
  }
  timeval_add(&usage->ru_utime, u);
  timeval_add(&usage->ru_stime, s);
  return 0;
}

static clock_t ticks_add(clock_t t, int64_t ns) {
  int64_t v = (int64_t)t + ns / NS_PER_TICK;
  return (clock_t)(v < 0 ? 0 : v);
}

/* The kernel's answer (ticks since boot) is kept; -1 for a bad pointer,
 * as glibc's. */
API clock_t times(struct tms *buf) {
  ID_WINDOW(); /* the kernel's counts until the offsets are added */
  long r = SYS1(times, buf);
  /* Ticks since boot may look like an error number: only EFAULT is one
   * (glibc's test). */
  if (r == -EFAULT) return (clock_t)fail(EFAULT);
  if (buf && UNLIKELY(cpu_times_set())) {
    buf->tms_utime = ticks_add(buf->tms_utime, appshot_cpu_times.user_ns);
    buf->tms_stime = ticks_add(buf->tms_stime, appshot_cpu_times.system_ns);
    buf->tms_cutime = ticks_add(buf->tms_cutime, appshot_cpu_times.child_user_ns);
    buf->tms_cstime = ticks_add(buf->tms_cstime, appshot_cpu_times.child_system_ns);
  }
  return (clock_t)r;
}

/* glibc's reads its clock through an internal call this library does not
 * see: the process's CPU time in CLOCKS_PER_SEC (a million) units. */
API clock_t clock(void) {
  ID_WINDOW(); /* the kernel's count until the offset is added */
  struct timespec ts;
  if (SYS2(clock_gettime, CLOCK_PROCESS_CPUTIME_ID, &ts) < 0) return (clock_t)-1;
  cpu_clock_answer(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (clock_t)(ts.tv_sec * CLOCKS_PER_SEC + ts.tv_nsec / (1000000000 / CLOCKS_PER_SEC));
}

/* Whose stat file a view is made of (its descriptor's link says, with
 * system ids: preload_view.c) says what its times get: process `spid`'s
 * own ("/proc/<pid>/stat", stid 0: fields 14-15 its times, 16-17 its
 * reaped children's), or its thread `stid`'s ("/proc/<pid>/task/<tid>/stat":
 * 14-15 the thread's, 16-17 the process's children's again). Of the
 * caller's own process only: another's offsets are in its memory. After
 * a restore only. */
int cpu_stat_offsets(int32_t spid, int32_t stid, int64_t add[4]) {
  if (!cpu_times_set() || spid != (int32_t)SYS0(getpid)) return 0;
  add[2] = appshot_cpu_times.child_user_ns;
  add[3] = appshot_cpu_times.child_system_ns;
  if (!stid) {
    add[0] = appshot_cpu_times.user_ns;
    add[1] = appshot_cpu_times.system_ns;
    return 1;
  }
  int32_t vtid;
  if (!appshot_s2v(g_h, APPSHOT_PID, stid, &vtid)) return 0;
  const struct appshot_cpu_thread *t = vtid == self_vtid() ? own_cpu_thread() : cpu_thread(vtid, stid);
  add[0] = t ? t->user_ns : 0;
  add[1] = t ? t->system_ns : 0;
  return 1;
}

/* The clock of kernel timer `kid` as /proc/self/timers shows it (the
 * kernel's encoding: CLOCK_PROCESS_CPUTIME_ID is -6, the creating
 * thread's CLOCK_THREAD_CPUTIME_ID -2, another process's or thread's
 * clock holds its system id). 1 if found. Read by bare system calls: the
 * library's own copy of the file is for the application. */
static int timer_clock(int32_t kid, long *clk) {
  long fd = SYS3(openat, AT_FDCWD, "/proc/self/timers", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024], line[96];
  size_t used = 0;
  int mine = 0, found = 0;
  long n;
  while (!found && (n = SYS3(read, fd, buf, sizeof buf)) > 0) {
    for (long i = 0; i < n && !found; i++) {
      if (buf[i] != '\n') {
        if (used < sizeof line - 1) line[used++] = buf[i];
        continue;
      }
      line[used] = '\0';
      used = 0;
      const char *p = line;
      long v = 0;
      int neg = 0;
      if (!strncmp(line, "ID: ", 4)) p += 4;
      else if (mine && !strncmp(line, "ClockID: ", 9)) p += 9;
      else continue;
      if (*p == '-') neg = 1, p++;
      for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (*p - '0');
      if (line[0] == 'I') mine = v == kid;
      else *clk = neg ? -v : v, found = 1;
    }
  }
  SYS1(close, fd);
  return found;
}

int cpu_timer_deadline(timer_t timerid, const struct itimerspec *value, struct itimerspec *out) {
  if (!cpu_times_set()) return 0;
  /* glibc's timer_t is the kernel's id, but for a SIGEV_THREAD timer (a
   * negative one: its helper thread's descriptor, whose id glibc keeps to
   * itself). */
  intptr_t kid = (intptr_t)timerid;
  if (kid < 0 || kid > INT32_MAX) return 0;
  /* A system id read from /proc, until made virtual, and then a deadline
   * of this node's count: the caller's window (timer_settime's, held
   * across this call to the system call) covers both. None here: inlined
   * into that caller, a window of its own would open at the caller's stack
   * pointer, which id_window_open takes for one a longjmp left behind,
   * closing the caller's as well. */
  long k;
  if (!timer_clock((int32_t)kid, &k) || k >= 0 || (k & CPUCLOCK_WHICH_MASK) == CPUCLOCK_FD) return 0;
  clockid_t clk;
  if (k == -6) {
    clk = CLOCK_PROCESS_CPUTIME_ID;
  } else if (k == -2) {
    /* The creating thread's; /proc does not say which: taken as the
     * caller's, the thread that made it as a rule. */
    clk = CLOCK_THREAD_CPUTIME_ID;
  } else {
    int32_t sid = ~((int32_t)k >> 3), vid;
    if (!appshot_s2v(g_h, APPSHOT_PID, sid, &vid)) return 0;
    clk = (clockid_t)(((uint32_t)~vid << 3) | ((uint32_t)k & 7u));
  }
  int64_t off = cpu_clock_offset(clk);
  if (!off || !cpu_deadline_valid(&value->it_value)) return 0;
  *out = *value;
  if (!out->it_value.tv_sec && !out->it_value.tv_nsec) return 1; /* disarm */
  timespec_add(&out->it_value, -off);
  /* Still armed, at once if passed: zero would disarm it. */
  if (!out->it_value.tv_sec && !out->it_value.tv_nsec) out->it_value.tv_nsec = 1;
  return 1;
}
