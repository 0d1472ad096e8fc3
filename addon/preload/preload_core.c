/*
 * Init, real-function resolution and the id helpers shared by every file.
 */
#include "preload.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct appshot_header *g_h;
int32_t g_vpid;
int g_nocache;
__thread int32_t t_vtid;
__thread struct appshot_id_window t_id_window;
/* Where t_id_window lives, from the thread pointer (preload.h): the same
 * for every thread of a process (static TLS), set by init. 0: not yet. */
long appshot_id_window_tpoff;

/* The thread pointer (x86-64: the fs base, which the TCB's first word
 * holds), as a snapshot reads it from the thread's registers. */
static char *thread_pointer(void) {
  char *tp;
  __asm__("mov %%fs:0, %0" : "=r"(tp));
  return tp;
}
int g_init_state;
void *real_fn[R_COUNT];
void *real__Fork;

/* The thread running init, by its thread pointer: a TID would change if
 * a snapshot caught init and a restore brought it back. */
static char *g_init_tp;
static pthread_key_t g_thread_key;
static int g_thread_key_ok;

/* A thread's entry must go when the thread does: its TID is free in the
 * system from then on, and the next thread to get it is someone else.
 * The entry as it is now, (its virtual TID, its TID): the value kept is
 * only the sign that it was mapped. A restore gives the thread a new TID
 * but brings its memory, this value with it, back as it was: the TID
 * saved is the old node's, which here may be another process's (review33
 * M4: the thread's own entry stayed for good, and another's could go).
 * Runs on the exiting thread, its TLS still there. */
static void thread_gone(void *value) {
  cpu_thread_gone();
  int32_t vtid = t_vtid;
  if (g_h && value && vtid > 0) appshot_unmap_pair(g_h, APPSHOT_PID, vtid, (int32_t)SYS0(gettid));
}

static void resolve_real(void) {
  static const char *const names[R_PLAIN_COUNT] = {
#define X(n) #n,
      REAL_FUNCS(X)
#undef X
  };
  for (int i = 0; i < R_PLAIN_COUNT; i++) real_fn[i] = dlsym(RTLD_NEXT, names[i]);
  static const struct {
    const char *name, *version;
  } compat[R_COUNT - R_PLAIN_COUNT] = {
#define X(n, sym, ver) {#sym, ver},
      REAL_COMPAT_FUNCS(X)
#undef X
  };
  for (int i = R_PLAIN_COUNT; i < R_COUNT; i++)
    real_fn[i] = dlvsym(RTLD_NEXT, compat[i - R_PLAIN_COUNT].name,
                        compat[i - R_PLAIN_COUNT].version);
  /* glibc keeps the condition waits under two versions each, the first a
   * compatibility one for another layout of pthread_cond_t: the one that
   * programs link against is named, not left to dlsym's choice. */
  static const struct {
    int index;
    const char *name, *version;
  } versioned[] = {
      {R_pthread_cond_wait, "pthread_cond_wait", "GLIBC_2.3.2"},
      {R_pthread_cond_timedwait, "pthread_cond_timedwait", "GLIBC_2.3.2"},
      {R_pthread_cond_clockwait, "pthread_cond_clockwait", "GLIBC_2.34"},
  };
  real__Fork = dlsym(RTLD_NEXT, "_Fork");
  for (unsigned i = 0; i < sizeof versioned / sizeof *versioned; i++) {
    void *f = dlvsym(RTLD_NEXT, versioned[i].name, versioned[i].version);
    if (f) real_fn[versioned[i].index] = f;
  }
}

static void init_tables(void) {
  const char *aid = getenv("APPSHOT_AID");
  if (!aid || !*aid) return;
  int fd;
  struct appshot_header *h = tables_attach(aid, getenv("APPSHOT_TABLES_FD"),
                                           getenv("APPSHOT_TABLES"), &fd);
  if (!h) return;
  /* Kept even if we cannot join below: our children may. */
  g_tables_fd = fd;
  int32_t spid = (int32_t)SYS0(getpid);
  test_pause("init-pid-read");
  int32_t vpid = appshot_map_system(h, APPSHOT_PID, spid, 0, 0);
  if (vpid < 0) { /* table full: better real ids than wrong ones */
    appshot_table_close(h);
    return;
  }
  g_vpid = vpid;
  g_thread_key_ok = pthread_key_create(&g_thread_key, thread_gone) == 0;
  pthread_atfork(NULL, NULL, pid_atfork_child);
  __atomic_store_n(&g_h, h, __ATOMIC_RELEASE);
  landlock_at_start(spid);
  dnotify_after_exec();
}

/* Runs once, from the constructor or from whichever wrapper is called first
 * (another library's constructor may run before ours). */
/* NOINLINE: wrappers call it (by ensure_init) inside their windows
 * (preload.h: an inner window must begin in a deeper frame). */
NOINLINE void init_slow(void) {
  int expected = 0;
  char *tp = thread_pointer();
  if (__atomic_compare_exchange_n(&g_init_state, &expected, 1, 0,
                                  __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    __atomic_store_n(&g_init_tp, tp, __ATOMIC_RELEASE);
    /* Init is a translation window (preload.h): it holds our system PID
     * on its way into the tables, and the loader's lock inside dlsym
     * (restored under a new TID, the thread could not unlock it). The
     * mark's offset is published first, so that a snapshot sees it. */
    appshot_id_window_tpoff =
        (long)((char *)&t_id_window - thread_pointer());
    appshot_timed_wait_tpoff =
        (long)((char *)&t_timed_wait - thread_pointer());
    ID_WINDOW();
    resolve_real();
    exec_capture_env();
    init_tables();
    __atomic_store_n(&g_init_state, 2, __ATOMIC_RELEASE);
    return;
  }
  /* Init itself calls open, mmap...: on its own thread that re-entry runs
   * pass-through (g_h is not set yet). Other threads wait for it. */
  if (__atomic_load_n(&g_init_tp, __ATOMIC_ACQUIRE) == tp) return;
  while (__atomic_load_n(&g_init_state, __ATOMIC_ACQUIRE) != 2)
    SYS0(sched_yield);
}

__attribute__((constructor)) static void preload_ctor(void) { ensure_init(); }

int pid_arg(pid_t vid, pid_t *sid, int err) {
  if (vid == 0 || vid == -1) {
    *sid = vid;
    return 0;
  }
  if (vid == INT32_MIN) return err;
  pid_t s;
  if (!v2s_pid(vid < 0 ? -vid : vid, &s)) return err;
  *sid = vid < 0 ? -s : s;
  return 0;
}

/* Our own PID, read from the kernel and mapped. A translation window
 * (preload.h): stopped between the read and the mapping, snapshotted and
 * restored, the thread would map the old node's PID as a new process.
 * NOINLINE, as self_vtid: called inside other windows (preload.h). */
static NOINLINE pid_t map_self(void) {
  ID_WINDOW();
  int32_t spid = (int32_t)SYS0(getpid);
  test_pause("own-pid-read");
  int32_t v = appshot_map_system(g_h, APPSHOT_PID, spid, 0, 0);
  /* Only a full table gets here. The system id is the least harmful answer:
   * 0 or -1 would make kill(getpid(), sig) signal a whole group. */
  return v >= 0 ? v : spid;
}

pid_t self_vpid(void) {
  if (UNLIKELY(__atomic_load_n(&g_nocache, __ATOMIC_RELAXED)))
    return map_self();
  int32_t v = g_vpid;
  if (LIKELY(v)) return v;
  /* A fork child learns its virtual PID when first asked (see
   * pid_atfork_child). Any thread or handler that races here computes the
   * same value: the table holds one entry per system PID. */
  v = map_self();
  g_vpid = v;
  return v;
}

/* NOINLINE: wrappers ask for it inside their own windows (preload.h: an
 * inner window must begin in a deeper frame). */
NOINLINE pid_t self_vtid(void) {
  int nocache = __atomic_load_n(&g_nocache, __ATOMIC_RELAXED);
  if (LIKELY(t_vtid && !nocache)) return t_vtid;
  /* A window, as map_self's: our TID is on its way into the tables. */
  ID_WINDOW();
  int32_t stid = (int32_t)SYS0(gettid);
  int32_t spid = (int32_t)SYS0(getpid);
  test_pause("own-tid-read");
  if (stid == spid) {
    pid_t v = self_vpid();
    if (!nocache) t_vtid = v;
    return v;
  }
  /* An entry already there for this TID is reused (a dead thread's, whose
   * TID the kernel handed out again, as a reused PID would be), and once
   * memory is shared with a clone child (nocache) both sides may map the
   * same id and must agree on one entry. */
  int32_t v = appshot_map_system(g_h, APPSHOT_PID, stid,
                                 APPSHOT_F_THREAD, spid);
  if (v < 0) return stid;
  appshot_set_flags(g_h, APPSHOT_PID, spid, APPSHOT_F_THREADS);
  if (!nocache) {
    t_vtid = v;
    if (g_thread_key_ok)
      pthread_setspecific(g_thread_key, (void *)(intptr_t)stid);
  }
  return v;
}

void child_reset_ids(int32_t vid) {
  g_vpid = vid;
  t_vtid = vid;
  /* Our own copy of the memory: the reaped ring is shared with nobody. */
  if (g_reaped_shared) g_reaped_shared = 0;
  late_sigchld_forget();
  /* Its CPU time is counted afresh by the kernel. */
  cpu_times_forget();
  /* A fork from a secondary thread: the child's only thread is a main
   * thread, whose entry must not be dropped as a thread's on its exit. */
  if (g_thread_key_ok) pthread_setspecific(g_thread_key, NULL);
}
