/* The table mapping's fault guard: see tablesguard.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "tablesguard.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* One guarded step in progress. On the stack of tables_guard_run. */
struct guard {
  sigjmp_buf jump;
  uintptr_t lo, hi;
  /* The thread's robust list and its pending entry as the step began: a
   * step ended inside appshot_lock or while holding it leaves the entry
   * naming the lock word, in a mapping the kernel would then write
   * through at the thread's exit. */
  struct robust_list_head *robust;
  struct robust_list *pending_was;
  struct guard *outer; /* the step this one runs inside, if any */
};

/* Which thread guards what. Not thread-local storage: the handler reads
 * this, and a thread-local variable of a dlopen'ed library may be
 * allocated on its first touch (malloc), which a signal handler must not
 * do. A slot is claimed by a thread for its outermost step and given back
 * when that step ends. */
#define GUARD_SLOTS 64
static struct {
  long tid; /* 0: free */
  struct guard *top;
} slots[GUARD_SLOTS];

/* SIGBUS's action before the guard's: what a SIGBUS the guard does not
 * take goes on to. Written once, before the guard's handler is installed. */
static struct sigaction previous;
/* The previous action was one-shot (SA_RESETHAND) and has run: SIGBUS's
 * action is the default since, as the kernel would have made it. */
static int previous_spent;
static pthread_once_t installed = PTHREAD_ONCE_INIT;
static int install_errno;

static long own_tid(void) { return syscall(SYS_gettid); }

/* The kernel's default action for SIGBUS: the handler goes, and the
 * fault, once this returns, happens again without it (the kernel's own
 * treatment of a fault whose signal is ignored); a sent signal is sent
 * again, pending until this returns. */
static void default_action(int sig, const siginfo_t *si) {
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, NULL);
  if (si->si_code <= 0) raise(sig);
}

/* What the SIGBUS would have done without us: the previous action, run as
 * the kernel would have run it. Its handler kind (SA_SIGINFO or plain),
 * and the mask it asked for: its sa_mask blocked and, unless SA_NODEFER,
 * SIGBUS too, on top of the mask of the code the signal interrupted. A
 * one-shot handler (SA_RESETHAND) runs once; the default action after.
 * SIG_DFL and SIG_IGN are the values 0 and 1 of either field (the kernel
 * looks at sa_handler whatever the flags). */
static void chain(int sig, siginfo_t *si, void *uc) {
  const struct sigaction was = previous;
  if (was.sa_handler == SIG_IGN) {
    /* A signal sent by a process, ignored before: ignored still. A
     * fault: the kernel does not let it be ignored. */
    if (si->si_code <= 0) return;
    default_action(sig, si);
    return;
  }
  if (was.sa_handler == SIG_DFL || ((was.sa_flags & SA_RESETHAND) && __atomic_exchange_n(&previous_spent, 1, __ATOMIC_ACQ_REL))) {
    default_action(sig, si);
    return;
  }
  sigset_t mask = ((ucontext_t *)uc)->uc_sigmask;
  for (int s = 1; s < NSIG; s++)
    if (sigismember(&was.sa_mask, s) == 1) sigaddset(&mask, s);
  if (!(was.sa_flags & SA_NODEFER)) sigaddset(&mask, sig);
  else sigdelset(&mask, sig);
  sigset_t ours;
  pthread_sigmask(SIG_SETMASK, &mask, &ours);
  if (was.sa_flags & SA_SIGINFO) was.sa_sigaction(sig, si, uc);
  else was.sa_handler(sig);
  pthread_sigmask(SIG_SETMASK, &ours, NULL);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  int saved = errno;
  /* Only a fault the kernel raised (si_code > 0), not a kill(). */
  if (si->si_code > 0) {
    const long tid = own_tid();
    const uintptr_t at = (uintptr_t)si->si_addr;
    for (int i = 0; i < GUARD_SLOTS; i++) {
      if (__atomic_load_n(&slots[i].tid, __ATOMIC_ACQUIRE) != tid) continue;
      struct guard *g = __atomic_load_n(&slots[i].top, __ATOMIC_ACQUIRE);
      if (g && at >= g->lo && at < g->hi) siglongjmp(g->jump, 1);
      break;
    }
  }
  chain(sig, si, uc);
  errno = saved;
}

static void install(void) {
  if (sigaction(SIGBUS, NULL, &previous) != 0) {
    install_errno = errno;
    return;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  /* A system call a sent SIGBUS interrupts is restarted, or not, as the
   * previous handler asked: the signal is its. */
  const int handled = previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | (handled ? previous.sa_flags & SA_RESTART : SA_RESTART);
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, NULL) != 0) install_errno = errno;
}

/* Whether SIGBUS's handler is still the guard's. Anything that sets its
 * own afterwards takes the guard away: Node's process.on('SIGBUS') does
 * (libuv installs its handler without keeping ours, and its handler only
 * notes the signal and returns, so that a fault in a guarded step comes
 * back at once, for ever, or until the file grows back). */
static int guard_in_place(void) {
  struct sigaction now;
  if (sigaction(SIGBUS, NULL, &now) != 0) return 0;
  return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus;
}

int tables_guard_install(void) {
  pthread_once(&installed, install);
  if (install_errno) {
    errno = install_errno;
    return -1;
  }
  return 0;
}

/* The calling thread's slot, claimed if it has none; -1 if none is free. */
static int slot_of(long tid) {
  for (int i = 0; i < GUARD_SLOTS; i++)
    if (__atomic_load_n(&slots[i].tid, __ATOMIC_ACQUIRE) == tid) return i;
  for (int i = 0; i < GUARD_SLOTS; i++) {
    long free_ = 0;
    if (__atomic_compare_exchange_n(&slots[i].tid, &free_, tid, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return i;
  }
  return -1;
}

int tables_guard_run(const void *base, size_t len, void (*body)(void *), void *arg) {
  if (tables_guard_install() != 0) return -1;
  /* Its handler replaced: the step does not run unguarded. */
  if (!guard_in_place()) {
    errno = ENOTRECOVERABLE;
    return -1;
  }
  const long tid = own_tid();
  const int slot = slot_of(tid);
  if (slot < 0) {
    errno = EAGAIN;
    return -1;
  }
  struct guard g;
  g.lo = (uintptr_t)base;
  g.hi = (uintptr_t)base + len;
  g.robust = NULL;
  g.pending_was = NULL;
  size_t head_len = 0;
  if (syscall(SYS_get_robust_list, 0, &g.robust, &head_len) != 0 || head_len != sizeof *g.robust)
    g.robust = NULL;
  if (g.robust) g.pending_was = __atomic_load_n(&g.robust->list_op_pending, __ATOMIC_RELAXED);
  g.outer = slots[slot].top;
  int faulted = 0;
  /* 1: the signal mask as it is now comes back with the jump (a step
   * inside the lock had blocked nearly everything). */
  if (sigsetjmp(g.jump, 1) == 0) {
    __atomic_store_n(&slots[slot].top, &g, __ATOMIC_RELEASE);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    body(arg);
  } else {
    faulted = 1;
    if (g.robust) __atomic_store_n(&g.robust->list_op_pending, g.pending_was, __ATOMIC_RELAXED);
  }
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&slots[slot].top, g.outer, __ATOMIC_RELEASE);
  if (!g.outer) __atomic_store_n(&slots[slot].tid, 0, __ATOMIC_RELEASE);
  return faulted;
}

struct drop {
  unsigned *word;
  unsigned tid;
};

/* The step was abandoned inside its critical section: between an entry's
 * write and its index's, say, or halfway through a repair. So the word is
 * let go as a dead holder's (FUTEX_OWNER_DIED, FUTEX_WAITERS kept, as the
 * kernel marks it and as appshot_table.c's mark_gone does), not as free:
 * the next locker then rebuilds the indexes from the entry arrays
 * (repair_locked). A repair of a table that needed none costs little; a
 * half-written table marked clean stays inconsistent. A sleeper, if any,
 * is woken to take it. */
static void drop_if_mine(void *arg) {
  struct drop *d = arg;
  unsigned seen = __atomic_load_n(d->word, __ATOMIC_RELAXED);
  if ((seen & FUTEX_TID_MASK) != d->tid) return;
  if (!__atomic_compare_exchange_n(d->word, &seen, FUTEX_OWNER_DIED | (seen & FUTEX_WAITERS), 0, __ATOMIC_RELEASE,
                                   __ATOMIC_RELAXED))
    return;
  if (seen & FUTEX_WAITERS) syscall(SYS_futex, d->word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

void tables_guard_drop_lock(const void *base, size_t len, unsigned *word) {
  struct drop d = {word, (unsigned)own_tid() & FUTEX_TID_MASK};
  tables_guard_run(base, len, drop_if_mine, &d);
}
