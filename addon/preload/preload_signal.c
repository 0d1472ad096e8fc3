/*
 * PIDs inside signal data: the `si_pid` a SA_SIGINFO handler is given and
 * the `ssi_pid` read from a signalfd are system PIDs from the kernel; the
 * application must see the virtual PID of the sender (or of the child, for
 * SIGCHLD), as it does from kill, waitid and sigtimedwait.
 *
 * Handlers: sigaction installs a translating handler of ours in the kernel
 * and keeps the program's in g_actions; ours translates the siginfo in place
 * (the kernel built it on the signal frame for this delivery only) and calls
 * the program's. sigaction hands the program's handler back as the old
 * action, so the program never sees ours. Memory is snapshotted whole, so
 * the kernel's action (our handler) and g_actions come back together.
 * Every handler goes through ours, not only SA_SIGINFO ones (given
 * SA_SIGINFO in the kernel, and called as the kernel calls any handler,
 * with the three arguments): ours also holds a handler back while the
 * thread has a semop made and not yet written in the SEM_UNDO table
 * (preload_ipc.c, "A semop in flight"; semop_signal_held below).
 *
 * signalfd: reads of a descriptor made by signalfd() are translated. Which
 * descriptors those are is a bitmap kept by signalfd, close, dup2/dup3 and
 * close_range; a read is translated only if the bit is set, the descriptor is
 * an anonymous inode and the read is whole signalfd records, so a stale bit
 * (a descriptor closed behind our back by a raw system call) cannot make us
 * rewrite another file's data.
 */
#include "preload.h"

#include <sys/signalfd.h>
#include <ucontext.h>

#include <dlfcn.h>

/* glibc's sigaction, which ours hands on to: found by its other name,
 * __sigaction, which glibc exports too and ours takes as well (a program
 * that called it by name installed its handler past ours). Resolved by
 * the constructor below, or at the first call if one comes sooner (a
 * constructor of a library initialised before ours), before init. */
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn g_glibc_sigaction;
static sigaction_fn glibc_sigaction(void) {
  sigaction_fn f = __atomic_load_n(&g_glibc_sigaction, __ATOMIC_ACQUIRE);
  if (UNLIKELY(!f)) {
    f = (sigaction_fn)dlsym(RTLD_NEXT, "__sigaction");
    if (!f) f = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (!f) SYS1(exit_group, 127); /* no libc: cannot be */
    __atomic_store_n(&g_glibc_sigaction, f, __ATOMIC_RELEASE);
  }
  return f;
}
__attribute__((constructor)) static void resolve_glibc_sigaction(void) { glibc_sigaction(); }

typedef void (*action_fn)(int, siginfo_t *, void *);
static action_fn g_actions[_NSIG];
/* The program's sa_flags for g_actions[sig]: what the old action shows,
 * and whether the kernel has reset it already (SA_RESETHAND). */
static unsigned long g_flags[_NSIG];
/* In g_flags: the kernel's action is ours, and its SA_SIGINFO ours, not
 * the program's. A one-shot handler the kernel has reset to SIG_DFL keeps
 * its flags there, SA_SIGINFO with them: not shown (review r272). Cleared
 * when the program installs SIG_DFL or SIG_IGN. */
#define SIGINFO_ADDED (1ul << 63)

/* The handler the kernel is given. The siginfo the kernel builds on the
 * frame holds the sender's system PID from the moment the frame exists:
 * the translation window (preload.h) must be raised by the handler's very
 * first instructions, which C cannot promise. So the kernel's entry is a
 * stub that raises t_id_window (open++, and sp if it was the first, or
 * if the open ones began below it) and
 * calls translating_action, which lowers it once the siginfo is
 * translated, before the program's handler runs (which may never return:
 * siglongjmp). A snapshot treats a thread whose instruction pointer is in
 * the stub before the mark is raised (from appshot_signal_entry to
 * appshot_signal_entry_raised, both exported) as inside the window
 * (src/ptrace/windows.ts). */
void appshot_signal_entry(int sig, siginfo_t *info, void *uc) API;
__asm__(".text\n"
        ".globl appshot_signal_entry\n"
        ".globl appshot_signal_entry_raised\n"
        ".type appshot_signal_entry, @function\n"
        "appshot_signal_entry:\n"
        /* Unwinders and profilers step through it: no frame of its own,
         * the return address (sa_restorer) at the top, CFA = rsp + 8. */
        "  .cfi_startproc\n"
        "  endbr64\n"
        "  xorl %ecx, %ecx\n"
        "  movq t_id_window@gottpoff(%rip), %rax\n"
        "  cmpl $0, %fs:(%rax)\n"
        "  je 2f\n"
        /* Windows open, begun at or above us: nested (normal). */
        "  cmpq %rsp, %fs:8(%rax)\n"
        "  jae 1f\n"
        /* Begun below us: left by a longjmp, or on another stack. Ours
         * begins here either way (a snapshot must see the thread inside);
         * translating_action, given where they began, tells which. */
        "  movq %fs:8(%rax), %rcx\n"
        "2:\n"
        "  movq %rsp, %fs:8(%rax)\n"
        "1:\n"
        /* Where ours began, among the first APPSHOT_WINDOW_DEPTH (r8 is
         * no argument of the handler's). */
        "  movl %fs:(%rax), %r8d\n"
        "  cmpl $8, %r8d\n"
        "  jae 3f\n"
        "  movq %rsp, %fs:16(%rax,%r8,8)\n"
        "3:\n"
        /* locked: threads sharing a thread pointer share the mark
         * (preload.h, g_tls_shared) */
        "  lock addl $1, %fs:(%rax)\n"
        "appshot_signal_entry_raised:\n"
        "  jmp translating_action\n"
        "  .cfi_endproc\n"
        ".size appshot_signal_entry, .-appshot_signal_entry\n");

/* A signal taken while the thread's semop is made and not yet written in
 * the SEM_UNDO table (semop_unrecorded): its handler is held until the
 * write ends, so that a handler which blocks, or leaves by a longjmp,
 * never does so with the adjustment in neither place. The signal is
 * queued again to this thread as it came (its siginfo untranslated),
 * blocked now and in the mask the interrupted code goes on with; the
 * semop unblocks it once written (a standard signal already pending
 * again merges with it, as two sent together do). Returns 1 if held.
 * A fault cannot wait (it would only fault again), nor a handler the
 * kernel has already reset (SA_RESETHAND: queued again, it would meet
 * the default action), nor a signal the kernel will not queue again (a
 * full real-time queue): the handler runs now and the table is marked
 * unknown, which a snapshot refuses by name. */
static int semop_signal_held(int sig, siginfo_t *info, void *uc) {
  if (!semop_unrecorded(uc)) return 0;
  const int fault = info && info->si_code > 0 &&
                    (sig == SIGSEGV || sig == SIGBUS || sig == SIGFPE || sig == SIGILL ||
                     sig == SIGTRAP || sig == SIGSYS);
  uint64_t bit = 1ull << (sig - 1);
  if (!info || !uc || fault || sig > 64 || (g_flags[sig] & SA_RESETHAND) ||
      SYS4(rt_sigprocmask, SIG_BLOCK, &bit, NULL, sizeof bit) != 0) {
    sem_undo_unknown();
    return 0;
  }
  if (SYS4(rt_tgsigqueueinfo, SYS0(getpid), SYS0(gettid), sig, info) != 0) {
    sem_undo_unknown(); /* the mask goes back as it was when the handler returns */
    return 0;
  }
  sigaddset(&((ucontext_t *)uc)->uc_sigmask, sig);
  __atomic_or_fetch(&t_semop.deferred, bit, __ATOMIC_RELAXED);
  return 1;
}

/* Entered from the stub, with the window raised; `below`: where the open
 * windows the stub found began, if below the stub's stack pointer. */
__attribute__((used)) void translating_action(int sig, siginfo_t *info, void *uc,
                                             uintptr_t below) HIDDEN;
void translating_action(int sig, siginfo_t *info, void *uc, uintptr_t below) {
  if (UNLIKELY(below)) id_window_raised_above(below);
  action_fn program = __atomic_load_n(&g_actions[sig], __ATOMIC_ACQUIRE);
  struct semop_suspended flight;
  flight.state = SEMOP_IDLE;
  if (UNLIKELY(__atomic_load_n(&t_semop.state, __ATOMIC_RELAXED) != SEMOP_IDLE ||
               __atomic_load_n(&t_semop.deferred, __ATOMIC_RELAXED)) &&
      program) {
    if (__atomic_load_n(&t_semop.state, __ATOMIC_RELAXED) != SEMOP_IDLE) {
      if (semop_signal_held(sig, info, uc)) {
        id_window_close(NULL);
        return;
      }
      semop_suspend(&flight);
    }
    /* This handler runs now: signals held before it are let go first
     * (suspended above, they run at once, nested here). */
    semop_held_release(uc);
  }
  if (info && g_h) {
    int e = errno;
    translate_si_pid(info);
    errno = e;
  }
  id_window_close(NULL);
  if (program) program(sig, info, uc);
  if (UNLIKELY(flight.state != SEMOP_IDLE)) semop_resume(&flight);
}

/* Whether installing `handler` goes through ours: any handler. */
static int wants_translation(void *handler) {
  return handler != (void *)SIG_DFL && handler != (void *)SIG_IGN &&
         handler != (void *)appshot_signal_entry;
}

/* The part both sigaction and rt_sigaction through syscall() share: returns
 * the handler to give the kernel, its flags in *flags, having noted the
 * program's. */
static void *install(int sig, void *handler, unsigned long *flags,
                     action_fn *prev, unsigned long *prev_flags) {
  *prev = g_actions[sig];
  *prev_flags = g_flags[sig];
  if (!wants_translation(handler)) {
    if (*prev_flags & SIGINFO_ADDED)
      __atomic_store_n(&g_flags[sig], *prev_flags & ~SIGINFO_ADDED, __ATOMIC_RELAXED);
    return handler;
  }
  __atomic_store_n(&g_flags[sig], *flags | (*flags & SA_SIGINFO ? 0 : SIGINFO_ADDED), __ATOMIC_RELAXED);
  __atomic_store_n(&g_actions[sig], (action_fn)handler, __ATOMIC_RELEASE);
  *flags |= SA_SIGINFO;
  return (void *)appshot_signal_entry;
}

/* What the program is told its old handler was, and its flags. */
static void *shown(void *kernel_handler, action_fn prev) {
  return kernel_handler == (void *)appshot_signal_entry ? (void *)prev
                                                      : kernel_handler;
}
static unsigned long shown_flags(void *kernel_handler, unsigned long kernel_flags,
                                 unsigned long prev_flags) {
  if (kernel_handler == (void *)appshot_signal_entry)
    return (kernel_flags & ~(unsigned long)SA_SIGINFO) | (prev_flags & SA_SIGINFO);
  /* Ours, reset by the kernel as it took the signal. */
  if (kernel_handler == (void *)SIG_DFL && (kernel_flags & SA_RESETHAND) && (prev_flags & SIGINFO_ADDED))
    return kernel_flags & ~(unsigned long)SA_SIGINFO;
  return kernel_flags;
}

API int sigaction(int sig, const struct sigaction *act,
                  struct sigaction *old) {
  ensure_init();
  if (!g_h || sig <= 0 || sig >= _NSIG) return glibc_sigaction()(sig, act, old);
  struct sigaction mine;
  action_fn prev = g_actions[sig];
  unsigned long prev_flags = g_flags[sig];
  if (act) {
    mine = *act;
    unsigned long flags = (unsigned long)act->sa_flags;
    mine.sa_sigaction = (action_fn)install(sig, (void *)act->sa_sigaction, &flags, &prev, &prev_flags);
    mine.sa_flags = (int)flags;
    act = &mine;
  }
  int r = glibc_sigaction()(sig, act, old);
  if (r != 0) {
    int e = errno;
    __atomic_store_n(&g_flags[sig], prev_flags, __ATOMIC_RELAXED);
    __atomic_store_n(&g_actions[sig], prev, __ATOMIC_RELEASE);
    errno = e;
    return r;
  }
  if (old) {
    old->sa_flags = (int)shown_flags((void *)old->sa_sigaction, (unsigned long)old->sa_flags, prev_flags);
    old->sa_sigaction = (action_fn)shown((void *)old->sa_sigaction, prev);
  }
  return r;
}

/* The same function under glibc's other exported name. */
API int __sigaction(int sig, const struct sigaction *act, struct sigaction *old)
    __attribute__((alias("sigaction"), copy(sigaction)));

/* glibc's signal(), bsd_signal(), ssignal(), sysv_signal() and
 * siginterrupt() call its sigaction from inside libc, past ours: made
 * here as glibc makes them, through ours, so that their handlers are
 * wrapped too. Signals siginterrupt() asked to interrupt calls (bit
 * sig - 1): signal() installs them without SA_RESTART. */
static uint64_t g_sigintr;

static __sighandler_t installed(int sig, __sighandler_t handler, int flags, int mask_sig) {
  struct sigaction act, old;
  if (sig <= 0 || sig >= _NSIG || handler == SIG_ERR) {
    errno = EINVAL;
    return SIG_ERR;
  }
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  sigemptyset(&act.sa_mask);
  if (mask_sig && sigaddset(&act.sa_mask, sig) < 0) return SIG_ERR;
  act.sa_flags = flags;
  if (sigaction(sig, &act, &old) < 0) return SIG_ERR;
  return old.sa_handler;
}

API __sighandler_t signal(int sig, __sighandler_t handler) {
  int interrupts = sig > 0 && sig <= 64 && (__atomic_load_n(&g_sigintr, __ATOMIC_RELAXED) >> (sig - 1) & 1);
  return installed(sig, handler, interrupts ? 0 : SA_RESTART, 1);
}
API __sighandler_t bsd_signal(int sig, __sighandler_t handler) { return signal(sig, handler); }
API __sighandler_t ssignal(int sig, __sighandler_t handler) { return signal(sig, handler); }
API __sighandler_t sysv_signal(int sig, __sighandler_t handler) {
  return installed(sig, handler, SA_RESETHAND | SA_NODEFER, 0);
}
/* What signal() is in a program built for strict ISO C or POSIX (-std=c99
 * and the like: <signal.h> redirects it). */
API __sighandler_t __sysv_signal(int sig, __sighandler_t handler) { return sysv_signal(sig, handler); }

/* System V's sigset(): glibc's asks and installs through its own
 * sigaction, past ours, and handed back our entry as the old handler (and
 * a program that put it back gave it to the kernel without SA_SIGINFO):
 * made here the same way through ours (review r272). SIG_HOLD blocks the
 * signal and shows the handler; a handler (or SIG_DFL, SIG_IGN) is
 * installed with no flags and the signal unblocked; either way the old
 * disposition is SIG_HOLD if the signal was blocked. */
API __sighandler_t sigset(int sig, __sighandler_t disp) {
  sigset_t one, was;
  struct sigaction act, old;
  sigemptyset(&one);
  if (sig <= 0 || sig >= _NSIG || sigaddset(&one, sig) < 0 || disp == SIG_ERR) {
    errno = EINVAL;
    return SIG_ERR;
  }
  if (disp == SIG_HOLD) {
    if (sigprocmask(SIG_BLOCK, &one, &was) < 0) return SIG_ERR;
    if (sigismember(&was, sig)) return SIG_HOLD;
    if (sigaction(sig, NULL, &old) < 0) return SIG_ERR;
    return old.sa_handler;
  }
  memset(&act, 0, sizeof act);
  act.sa_handler = disp;
  sigemptyset(&act.sa_mask);
  if (sigaction(sig, &act, &old) < 0) return SIG_ERR;
  if (sigprocmask(SIG_UNBLOCK, &one, &was) < 0) return SIG_ERR;
  return sigismember(&was, sig) ? SIG_HOLD : old.sa_handler;
}

API int siginterrupt(int sig, int interrupt) {
  struct sigaction act;
  if (sigaction(sig, NULL, &act) < 0) return -1;
  if (sig > 0 && sig <= 64) {
    if (interrupt) __atomic_or_fetch(&g_sigintr, 1ull << (sig - 1), __ATOMIC_RELAXED);
    else __atomic_and_fetch(&g_sigintr, ~(1ull << (sig - 1)), __ATOMIC_RELAXED);
  }
  if (interrupt) act.sa_flags &= ~SA_RESTART;
  else act.sa_flags |= SA_RESTART;
  return sigaction(sig, &act, NULL) < 0 ? -1 : 0;
}

/* The kernel's struct sigaction, for rt_sigaction through syscall(). */
struct kernel_sigaction {
  void *handler;
  unsigned long flags;
  void *restorer;
  uint64_t mask;
};

long do_rt_sigaction(int sig, const void *act, void *old, size_t size) {
  if (sig <= 0 || sig >= _NSIG)
    return libc_ret(SYS4(rt_sigaction, sig, act, old, size));
  struct kernel_sigaction mine;
  action_fn prev = g_actions[sig];
  unsigned long prev_flags = g_flags[sig];
  if (act) {
    memcpy(&mine, act, sizeof mine);
    mine.handler = install(sig, mine.handler, &mine.flags, &prev, &prev_flags);
    act = &mine;
  }
  long r = SYS4(rt_sigaction, sig, act, old, size);
  if (r < 0) {
    __atomic_store_n(&g_flags[sig], prev_flags, __ATOMIC_RELAXED);
    __atomic_store_n(&g_actions[sig], prev, __ATOMIC_RELEASE);
    return libc_ret(r);
  }
  if (old) {
    struct kernel_sigaction *o = old;
    o->flags = shown_flags(o->handler, o->flags, prev_flags);
    o->handler = shown(o->handler, prev);
  }
  return 0;
}

/* --- Reads translated: signalfd (and message queues, preload_ipc.c) ------ */

/* One bit per descriptor whose reads hold system PIDs: read() looks at
 * one word for every descriptor, and at the file only for those marked. */
#define TRANSLATED_READS_TRACKED 4096 /* descriptors above are read untranslated */
static unsigned long g_translated_reads[TRANSLATED_READS_TRACKED / (8 * sizeof(long))];
#define BIT(fd) (1UL << ((unsigned)(fd) % (8 * sizeof(long))))
#define WORD(fd) g_translated_reads[(unsigned)(fd) / (8 * sizeof(long))]

static void mark_translated_read(int fd, int on) {
  if (fd < 0 || fd >= TRANSLATED_READS_TRACKED) return;
  if (on)
    __atomic_fetch_or(&WORD(fd), BIT(fd), __ATOMIC_RELAXED);
  else
    __atomic_fetch_and(&WORD(fd), ~BIT(fd), __ATOMIC_RELAXED);
}

void translated_reads_forget(int fd) {
  if (fd >= 0 && fd < TRANSLATED_READS_TRACKED &&
      UNLIKELY(__atomic_load_n(&WORD(fd), __ATOMIC_RELAXED) & BIT(fd)))
    mark_translated_read(fd, 0);
}

int translated_reads_marked(int fd) {
  return fd >= 0 && fd < TRANSLATED_READS_TRACKED &&
         (__atomic_load_n(&WORD(fd), __ATOMIC_RELAXED) & BIT(fd));
}

void translated_reads_mark(int fd, int on) {
  if (on) mark_translated_read(fd, 1);
  else translated_reads_forget(fd);
}

void translated_reads_forget_range(unsigned int first, unsigned int last) {
  for (unsigned int fd = first; fd <= last && fd < TRANSLATED_READS_TRACKED; fd++)
    translated_reads_forget((int)fd);
}

API int signalfd(int fd, const sigset_t *mask, int flags) {
  ensure_init();
  int r = (int)libc_ret(SYS4(signalfd4, fd, mask, _NSIG / 8, flags));
  if (r >= 0) mark_translated_read(r, 1);
  return r;
}

static void translate_signalfd_reads(void *buf, ssize_t n) {
  if (n % sizeof(struct signalfd_siginfo) != 0) return;
  struct signalfd_siginfo *s = buf;
  for (ssize_t i = 0; i < n / (ssize_t)sizeof *s; i++) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = (int)s[i].ssi_signo;
    si.si_code = s[i].ssi_code;
    si.si_pid = (pid_t)s[i].ssi_pid;
    translate_si_pid(&si);
    s[i].ssi_pid = (uint32_t)si.si_pid;
  }
}

/* Whether `fd` is a signalfd, by its link: a mark outlives a close that
 * did not come through us (a raw close, close_range), and any anonymous
 * inode that took the number (inotify, userfaultfd, perf) would have its
 * reads rewritten (review33 L12). Only a marked descriptor asks. */
static int is_signalfd(int fd) {
  static const char want[] = "anon_inode:[signalfd]";
  char link[32] = "/proc/self/fd/", got[sizeof want];
  *put_decimal(link + 14, (unsigned long)fd) = '\0';
  long n = SYS4(readlinkat, AT_FDCWD, link, got, sizeof got);
  return n == (long)sizeof want - 1 && memcmp(got, want, sizeof want - 1) == 0;
}

API ssize_t read(int fd, void *buf, size_t count) {
  ensure_init();
  /* Called by dlsym itself, while init resolves REAL(read)? */
  if (UNLIKELY(!real_fn[R_read])) return libc_ret(SYS3(read, fd, buf, count));
  if (LIKELY(!(fd >= 0 && fd < TRANSLATED_READS_TRACKED &&
                (__atomic_load_n(&WORD(fd), __ATOMIC_RELAXED) & BIT(fd)))))
    return REAL(read)(fd, buf, count); /* a cancellation point: glibc's */
  /* A signalfd's records, a message queue's text, hold system PIDs until
   * translated. Which of the two, by the file: a signalfd is an anonymous
   * inode (no file type). */
  ID_WINDOW();
  ssize_t n = REAL(read)(fd, buf, count);
  struct stat st;
  if (g_h && n > 0 && SYS2(fstat, fd, &st) == 0) {
    if ((st.st_mode & S_IFMT) == 0) {
      if (is_signalfd(fd)) translate_signalfd_reads(buf, n);
    } else {
      mqueue_translate_read(fd, buf, n);
    }
  }
  return n;
}
