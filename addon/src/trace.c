#define _GNU_SOURCE
#include "trace.h"
#include "appshot_batch.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <stddef.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif

#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif
#ifndef PTRACE_SECCOMP_GET_METADATA
#define PTRACE_SECCOMP_GET_METADATA 0x420d
#endif
#ifndef PTRACE_O_SUSPEND_SECCOMP
#define PTRACE_O_SUSPEND_SECCOMP (1 << 21)
#endif

/* Kernel-internal restart codes a stopped thread may hold in rax. */
#define ERESTARTSYS 512
#define ERESTARTNOINTR 513
#define ERESTARTNOHAND 514
#define ERESTART_RESTARTBLOCK 516

/* New threads and children of a seized task are seized too, so a process
 * cannot escape a snapshot by forking while it is being stopped. */
#define SEIZE_OPTIONS \
  (PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACESYSGOOD)

static int fail(void) { return -errno; }

int trace_seize(pid_t tid, int exit_kill) {
  long options = SEIZE_OPTIONS | (exit_kill ? PTRACE_O_EXITKILL : 0);
  return ptrace(PTRACE_SEIZE, tid, 0, (void*)options) ? fail() : 0;
}

int trace_keep_on_exit(pid_t tid) {
  return ptrace(PTRACE_SETOPTIONS, tid, 0, (void*)(long)SEIZE_OPTIONS) ? fail() : 0;
}

int trace_kill_on_exit(pid_t tid) {
  return ptrace(PTRACE_SETOPTIONS, tid, 0, (void*)(long)(SEIZE_OPTIONS | PTRACE_O_EXITKILL)) ? fail() : 0;
}

int trace_interrupt(pid_t tid) { return ptrace(PTRACE_INTERRUPT, tid, 0, 0) ? fail() : 0; }

int trace_cont(pid_t tid, int sig) {
  return ptrace(PTRACE_CONT, tid, 0, (void*)(long)sig) ? fail() : 0;
}

int trace_detach(pid_t tid, int sig) {
  return ptrace(PTRACE_DETACH, tid, 0, (void*)(long)sig) ? fail() : 0;
}

static void classify(pid_t tid, int status, trace_report* out) {
  memset(out, 0, sizeof *out);
  out->tid = tid;
  out->status = status;
  if (WIFEXITED(status) || WIFSIGNALED(status)) {
    out->kind = TRACE_EXITED;
    return;
  }
  int sig = WSTOPSIG(status);
  int event = (unsigned)status >> 16;
  out->sig = sig;
  if (sig == (SIGTRAP | 0x80)) {
    out->kind = TRACE_SYSCALL;
  } else if (event == PTRACE_EVENT_STOP) {
    /* SIGTRAP: our interrupt or a new task's first stop; a stop signal: the
     * task entered a job-control stop. */
    out->kind = (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
                    ? TRACE_GROUP_STOP
                    : TRACE_STOP;
  } else if (event) {
    out->kind = TRACE_EVENT;
    out->event = event;
    ptrace(PTRACE_GETEVENTMSG, tid, 0, &out->msg);
  } else {
    out->kind = TRACE_SIGNAL;
  }
}

/* Between two looks for a stop: true once `timeout_ms` have passed since
 * `start` (the caller reports none), else it waits a little first. A stop
 * usually arrives within microseconds (an injected system call, an
 * interrupt): the CPU is yielded to the tracee for a short first stretch
 * rather than slept away, whose wake-up costs more than the wait. Not
 * longer: a tracee queued behind this thread on its CPU is not always run
 * by sched_yield, and one waiting on a busy CPU is pulled to this one only
 * once it goes idle, so a longer spin made a stop now and then cost its
 * whole length (2 ms, where 25 us is usual). Then short naps, and longer
 * ones so a long timeout does not spin. */
static int waited_long_enough(const struct timespec* start, int timeout_ms) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  long elapsed_us = (now.tv_sec - start->tv_sec) * 1000000 + (now.tv_nsec - start->tv_nsec) / 1000;
  if (elapsed_us >= (long)timeout_ms * 1000) return 1;
  if (elapsed_us < 300) {
    sched_yield();
  } else {
    struct timespec nap = {0, elapsed_us < 5000 ? 20000 : 200000};
    nanosleep(&nap, NULL);
  }
  return 0;
}

static void no_report(trace_report* out) {
  memset(out, 0, sizeof *out);
  out->kind = TRACE_NONE;
}

int trace_wait(pid_t tid, int timeout_ms, trace_report* out) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    int status;
    pid_t got = waitpid(tid > 0 ? tid : -1, &status, __WALL | WNOHANG);
    if (got < 0) return fail();
    if (got > 0) {
      classify(got, status, out);
      return 0;
    }
    if (waited_long_enough(&start, timeout_ms)) {
      no_report(out);
      return 0;
    }
  }
}

int trace_wait_any(const pid_t* tids, size_t n, int timeout_ms, trace_report* out) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    for (size_t i = 0; i < n; i++) {
      int status;
      pid_t got = waitpid(tids[i], &status, __WALL | WNOHANG);
      /* ECHILD: gone, or not ours any more; the others may still report. */
      if (got > 0) {
        classify(got, status, out);
        return 0;
      }
    }
    if (n == 0 || waited_long_enough(&start, timeout_ms)) {
      no_report(out);
      return 0;
    }
  }
}

int trace_get_regs(pid_t tid, struct user_regs_struct* regs) {
  return ptrace(PTRACE_GETREGS, tid, 0, regs) ? fail() : 0;
}

int trace_set_regs(pid_t tid, const struct user_regs_struct* regs) {
  return ptrace(PTRACE_SETREGS, tid, 0, regs) ? fail() : 0;
}

int trace_get_xstate(pid_t tid, void* buf, size_t size) {
  struct iovec iov = {buf, size};
  if (ptrace(PTRACE_GETREGSET, tid, (void*)NT_X86_XSTATE, &iov)) return fail();
  return (int)iov.iov_len;
}

int trace_set_xstate(pid_t tid, void* buf, size_t size) {
  struct iovec iov = {buf, size};
  return ptrace(PTRACE_SETREGSET, tid, (void*)NT_X86_XSTATE, &iov) ? fail() : 0;
}

int trace_get_sigmask(pid_t tid, uint64_t* mask) {
  return ptrace(PTRACE_GETSIGMASK, tid, (void*)sizeof *mask, mask) ? fail() : 0;
}

int trace_set_sigmask(pid_t tid, uint64_t mask) {
  return ptrace(PTRACE_SETSIGMASK, tid, (void*)sizeof mask, &mask) ? fail() : 0;
}

int trace_get_siginfo(pid_t tid, void* info) {
  return ptrace(PTRACE_GETSIGINFO, tid, 0, info) ? fail() : 0;
}

int trace_peek_siginfo(pid_t tid, int shared, uint64_t from, void* buf, int max) {
  struct {
    uint64_t off;
    uint32_t flags;
    int32_t nr;
  } args = {from, shared ? 1u /* PTRACE_PEEKSIGINFO_SHARED */ : 0u, max};
  long n = ptrace(PTRACE_PEEKSIGINFO, tid, &args, buf);
  return n < 0 ? fail() : (int)n;
}

int trace_get_rseq(pid_t tid, trace_rseq* out) {
  memset(out, 0, sizeof *out);
  long n = ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, (void*)sizeof *out, out);
  return n < 0 ? fail() : 0;
}

int trace_get_robust_list(pid_t tid, uint64_t* head, uint64_t* len) {
  void* h = NULL;
  size_t l = 0;
  if (syscall(SYS_get_robust_list, tid, &h, &l)) return fail();
  *head = (uint64_t)(uintptr_t)h;
  *len = l;
  return 0;
}

long trace_seccomp_filter(pid_t tid, unsigned long index, void* buf, unsigned long count) {
  long n = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void*)index, NULL);
  if (n < 0) return fail();
  if (!buf) return n;
  if ((unsigned long)n > count) return -E2BIG;
  return ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void*)index, buf) < 0 ? fail() : n;
}

int trace_seccomp_flags(pid_t tid, unsigned long index, uint64_t* flags) {
  struct {
    uint64_t filter_off;
    uint64_t flags;
  } md = {index, 0};
  if (ptrace(PTRACE_SECCOMP_GET_METADATA, tid, (void*)sizeof md, &md) < 0) return fail();
  *flags = md.flags;
  return 0;
}

int trace_suspend_seccomp(pid_t tid, int exit_kill) {
  long opts = SEIZE_OPTIONS | PTRACE_O_SUSPEND_SECCOMP | (exit_kill ? PTRACE_O_EXITKILL : 0);
  return ptrace(PTRACE_SETOPTIONS, tid, 0, (void*)opts) ? fail() : 0;
}

/* Points the registers at a system call: the instruction, its number and
 * arguments. orig_rax = -1: no restart logic may touch these registers
 * when the thread leaves the stop it is in. */
static void load_syscall(struct user_regs_struct* r, uint64_t syscall_insn, long nr, const long args[6]) {
  r->rip = syscall_insn;
  r->rax = nr;
  r->orig_rax = (unsigned long)-1;
  r->rdi = args[0];
  r->rsi = args[1];
  r->rdx = args[2];
  r->r10 = args[3];
  r->r8 = args[4];
  r->r9 = args[5];
}

static int is_stop_signal(int sig);
static void take_back_stops(pid_t tid, unsigned stops);

int trace_inject_seed(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret) {
  struct user_regs_struct r;
  int rc = trace_get_regs(tid, &r);
  if (rc) return rc;
  load_syscall(&r, syscall_insn, nr, args);
  if ((rc = trace_set_regs(tid, &r))) return rc;
  unsigned stops = 0;
  rc = -EINTR;
  for (int tries = 0; tries < 16; tries++) {
    if (ptrace(PTRACE_SINGLESTEP, tid, 0, 0)) return fail();
    trace_report rep;
    if ((rc = trace_wait(tid, 10000, &rep))) break;
    if (rep.kind == TRACE_NONE) {
      rc = -ETIMEDOUT;
      break;
    }
    if (rep.kind == TRACE_EXITED) return -ESRCH;
    if (rep.kind == TRACE_SIGNAL && rep.sig == SIGTRAP) {
      if ((rc = trace_get_regs(tid, &r))) break;
      /* The trap of a step that has not run the instruction yet (a stop
       * that came first) leaves rip on it: step again. */
      if (r.rip != syscall_insn + 2) continue;
      *ret = (long)r.rax;
      rc = 0;
      break;
    }
    /* A pending stop signal: set aside, as in step_to_syscall_stop_forking. */
    if (rep.kind == TRACE_SIGNAL && is_stop_signal(rep.sig)) {
      stops |= 1u << rep.sig;
      continue;
    }
    /* As in step_to_syscall_stop_forking: an interrupt's trap, a job-control stop
     * reported again: resume once more. */
    if (rep.kind != TRACE_STOP && rep.kind != TRACE_GROUP_STOP) {
      rc = -EINTR;
      break;
    }
    rc = -EINTR;
  }
  take_back_stops(tid, stops);
  return rc;
}

int trace_rewind(struct user_regs_struct* r) {
  if ((long)r->orig_rax < 0) return 0;
  switch (-(long)r->rax) {
    case ERESTARTSYS:
    case ERESTARTNOINTR:
    case ERESTARTNOHAND:
      r->rax = r->orig_rax;
      r->rip -= 2;
      return 1;
    case ERESTART_RESTARTBLOCK:
      r->rax = SYS_restart_syscall;
      r->rip -= 2;
      return 1;
  }
  return 0;
}

/* A process stopped by job control may have stop signals pending (a second
 * SIGSTOP, a SIGTSTP after the SIGSTOP): they wait, as a stopped process
 * dequeues nothing, until a SIGCONT discards them. SIGSTOP cannot be
 * blocked, so a thread resumed to run an injected call dequeues it and
 * reports a signal-delivery-stop. The call goes on without it (resumed
 * with no signal) and the signal is queued again after (take_back_stops),
 * so that the process is left with it pending, as it was. */
static int is_stop_signal(int sig) { return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU; }

static void take_back_stops(pid_t tid, unsigned stops) {
  for (int sig = 1; sig < 32; sig++)
    if (stops & (1u << sig)) syscall(SYS_tkill, tid, sig);
}

/* Resumes `tid` to its next syscall stop. Other reports for it (a signal
 * that arrived meanwhile) are not expected while every thread of the
 * application is stopped; one is an error rather than something to lose,
 * but for a pending stop signal, set aside in *stops. `forked` (if not
 * NULL) gets the PID (in our PID namespace) of the task that a fork or
 * clone event on the way announced. */
static int step_to_syscall_stop_forking(pid_t tid, unsigned* stops, pid_t* forked) {
  for (int tries = 0; tries < 16; tries++) {
    if (ptrace(PTRACE_SYSCALL, tid, 0, 0)) return fail();
    trace_report r;
    int rc = trace_wait(tid, 10000, &r);
    if (rc) return rc;
    if (r.kind == TRACE_NONE) return -ETIMEDOUT;
    if (r.kind == TRACE_EXITED) return -ESRCH;
    if (r.kind == TRACE_SYSCALL) return 0;
    if (forked && r.kind == TRACE_EVENT && (r.event == PTRACE_EVENT_FORK || r.event == PTRACE_EVENT_CLONE || r.event == PTRACE_EVENT_VFORK))
      *forked = (pid_t)r.msg;
    if (r.kind == TRACE_SIGNAL && is_stop_signal(r.sig)) {
      *stops |= 1u << r.sig;
      continue;
    }
    /* A PTRACE_INTERRUPT that arrived while the thread was already stopped
     * traps again as soon as it resumes, before it runs a single
     * instruction; an injected fork or clone stops at its event before it
     * returns (the new task reports on its own); a thread of a process
     * stopped by job control reports that stop again first. Resume it once
     * more. */
    if (r.kind != TRACE_STOP && r.kind != TRACE_EVENT && r.kind != TRACE_GROUP_STOP) return -EINTR;
  }
  return -EINTR;
}

int trace_inject(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret) {
  return trace_inject_forking(tid, syscall_insn, nr, args, ret, NULL);
}

int trace_inject_forking(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret, pid_t* forked) {
  struct user_regs_struct saved, r;
  int rc = trace_get_regs(tid, &saved);
  if (rc) return rc;
  r = saved;
  load_syscall(&r, syscall_insn, nr, args);
  /* With every signal blocked, a signal that is pending (the kernel queues
   * them while we hold the thread, ignored ones included) stays pending
   * instead of being dequeued and stopping the thread mid-call. */
  uint64_t mask, all = ~0ull;
  if ((rc = trace_get_sigmask(tid, &mask))) return rc;
  if ((rc = trace_set_sigmask(tid, all))) return rc;
  if ((rc = trace_set_regs(tid, &r))) {
    trace_set_sigmask(tid, mask);
    return rc;
  }
  /* Entry, then exit: two stops, and no byte of the tracee is written. */
  unsigned stops = 0;
  if ((rc = step_to_syscall_stop_forking(tid, &stops, forked)) == 0) rc = step_to_syscall_stop_forking(tid, &stops, forked);
  take_back_stops(tid, stops);
  int rc3 = trace_set_sigmask(tid, mask);
  if (!rc) rc = rc3;
  if (rc == 0) {
    struct user_regs_struct after;
    rc = trace_get_regs(tid, &after);
    if (rc == 0) *ret = (long)after.rax;
  }
  /* The thread now sits in a syscall-exit stop, from which the kernel does
   * not restart an interrupted call: rewind it here instead. */
  trace_rewind(&saved);
  int rc2 = trace_set_regs(tid, &saved);
  return rc ? rc : rc2;
}

/*
 * Batched injection: a whole list of system calls run inside the thread in
 * one stop, instead of one ptrace round trip (two stops) per call.
 *
 * The code below is copied into the restored process's scratch area
 * (remote.ts maps it executable) and run from there. It takes a table at
 * rbx: a header {count, tgid, tid, flags} and `count` entries of eight
 * words {nr, six arguments, result}. It runs the calls in order, each
 * result written into its entry, and stops at the first that fails (the
 * entries after it keep what the caller put there), unless bit 0 of flags
 * says to run them all (queries, each of which may fail on its own). The
 * high half of an entry's nr word, if not 0, is (a << 16) | k: its
 * argument a (0-5, 0 the first) is the result of entry k (from 1), which
 * ran before it (a descriptor the batch made, say, that a later mmap of
 * the same batch maps). Then it stops itself
 * with tgkill(tgid, tid, SIG), SIG the end signal the tracer put in the
 * second byte of the header's flags (choose_batch_end) and the one signal
 * left unblocked while it runs: a signal-delivery stop the tracer sees
 * (and discards) even when the process ignores SIG, as a traced thread's
 * signals are queued whatever their action. Not a stop signal: any stop
 * signal sent to a process discards every SIGCONT pending in it (the
 * kernel's job control), so that one pending when the application was
 * frozen would be lost, its handler never run and the image without it
 * (it was SIGSTOP). Not an int3's trap either but where tgkill failed:
 * that is a forced signal, which resets a blocked or ignored SIGTRAP's
 * action to the default. The thread is taken back with its registers as
 * they were. Only rbx, r12, r13 and r14 and the registers of the calls
 * (rax, rcx, rdx...) are used: no stack.
 *
 * Should the tracer die while the thread runs the batch (kill -9 of
 * appshot, the OOM killer; a snapshot does not kill the application with
 * it), the thread is let go with the batch's registers and mask. It takes
 * the end signal as the process has it, which is why that is one the
 * process ignores where there is one; and past its tgkill, r14 points at
 * a signal frame the tracer wrote (batch_frame: the thread's registers,
 * mask and vector state as they were), onto which it rt_sigreturns: back
 * where it was, as if the batch never ran.
 */
__asm__(".pushsection .rodata\n" APPSHOT_BATCH_CODE("appshot_batch_code", "appshot_batch_stopped", "appshot_batch_trapped", "appshot_batch_code_end") ".popsection\n");

extern const unsigned char appshot_batch_code[], appshot_batch_stopped[], appshot_batch_trapped[], appshot_batch_code_end[];

const unsigned char* trace_batch_code(size_t* size, size_t* stopped_at) {
  *size = (size_t)(appshot_batch_code_end - appshot_batch_code);
  *stopped_at = (size_t)(appshot_batch_stopped - appshot_batch_code);
  return appshot_batch_code;
}

/* The process id the batch's tgkill gives (the table header's tgid, as
 * the process sees itself): an end signal with another sender is not ours. */
static pid_t sender_tgid(pid_t tid, uint64_t table) {
  errno = 0;
  long word = ptrace(PTRACE_PEEKDATA, tid, (void*)(table + 8), 0);
  return errno ? -1 : (pid_t)word;
}

static pid_t tgid_of(pid_t tid) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/%d/status", tid);
  FILE* f = fopen(path, "r");
  if (!f) return -1;
  pid_t tgid = -1;
  while (fgets(buf, sizeof buf, f))
    if (sscanf(buf, "Tgid: %d", &tgid) == 1) break;
  fclose(f);
  return tgid;
}

/* Whether signal `sig` waits in the thread's own queue (`shared` 0) or
 * its process's (`shared` 1). 1 or 0; -1 when it cannot be told (the
 * queue unreadable, or longer than is worth reading before every batch: a
 * backlog of real-time signals). */
static int pending_in(pid_t tid, int shared, int sig) {
  siginfo_t buf[32];
  for (uint64_t off = 0; off < 4 * 32;) {
    int n = trace_peek_siginfo(tid, shared, off, buf, 32);
    if (n < 0) return -1;
    for (int i = 0; i < n; i++)
      if (buf[i].si_signo == sig) return 1;
    if (n < 32) return 0;
    off += (uint64_t)n;
  }
  return -1;
}

/*
 * Whether `si` is what the kernel makes up for a signal that was pending
 * without its siginfo: one sent with a negative si_code (tgkill's among
 * them) while its receiver's user had RLIMIT_SIGPENDING signals queued
 * already, which the kernel still marks pending but cannot queue (its
 * "silent loss of information"), read back as SI_USER from PID 0. The
 * batch's own tgkill is one such under that limit: taken at the code's
 * end (past the tgkill), it is ours all the same. A signal taken there is
 * from the thread's own queue, where nothing else waited (a pending end
 * signal would have been taken when the thread was let go, at the code's
 * start); a sender whose tgkill came between the batch's last call and
 * its own, which the kernel then keeps as one pending signal with ours,
 * is the only other.
 */
static int infoless(const siginfo_t* si) { return si->si_code == SI_USER && si->si_pid == 0 && si->si_uid == 0; }

/* In the thread's own queue: one the batch takes at its start came from
 * there if so, as the kernel takes a thread's own signals before its
 * process's. */
static int pending_for_thread(pid_t tid, int sig) { return pending_in(tid, 0, sig); }

/* Where an end signal that came while the batch ran was most likely sent,
 * by its si_code: a tgkill's, or a trap or fault the kernel raised, to the
 * thread; a kill's, a sigqueue's or a timer's to the process (one aimed
 * at one thread is then taken as the process's: which thread takes it
 * may change, but it is not kept from a thread that waits for it). */
static int sent_to_process(const siginfo_t* si) {
  return !(si->si_code == SI_TKILL || si->si_code > 0);
}

/* A signal of the process's own, taken out of its queue by the batch
 * (which leaves only its end signal unblocked), queued again where it was:
 * to the thread, or to the process, where whichever thread does not block
 * it takes it (the batch's thread may well block it for good: a program
 * whose signals all go to one thread waiting for them). With its siginfo
 * where the kernel lets a tracer give one (a negative si_code, sigqueue's
 * or a timer's); else as the tracer's tkill (to the thread) or kill (to
 * the process, still SI_USER): the sender it names is then appshot. */
static void take_back_signal(pid_t tid, const siginfo_t* info, int to_process) {
  int sig = info->si_signo;
  pid_t tgid = tgid_of(tid);
  if (tgid > 0 && info->si_code < 0 && info->si_code != SI_TKILL) {
    siginfo_t copy = *info;
    long sent = to_process ? syscall(SYS_rt_sigqueueinfo, tgid, sig, &copy)
                           : syscall(SYS_rt_tgsigqueueinfo, tgid, tid, sig, &copy);
    if (sent == 0) return;
  }
  if (to_process && tgid > 0 && kill(tgid, sig) == 0) return;
  syscall(SYS_tkill, tid, sig);
}

/*
 * The signal that ends a batch, and whether the thread may go back on its
 * own (the frame of batch_frame). The batch stops at this signal, which a
 * traced thread reports whatever its action (the kernel queues every
 * signal of a traced task, ignored ones too); but if appshot is killed
 * (kill -9, the OOM killer) while the thread runs the batch, the thread
 * is let go untraced and takes the signal as the process has it. So,
 * where it can be, one whose action is to be ignored, not caught (SigCgt)
 * and pending nowhere (a sigwaitinfo or signalfd reader's would have to be
 * taken and queued again): the first such of SIGURG, SIGWINCH and
 * SIGCHLD. Otherwise SIGTRAP, as before: its default action would kill the
 * process in that case, but it is the least likely to be waited for or
 * caught. The frame is not used by a thread with a shadow stack (its
 * rt_sigreturn wants a token that only a real signal leaves).
 *
 * Chosen from /proc/TID/status (choose_batch_end), once per thread per
 * operation, not before every batch: the caller keeps the choice
 * (trace_batch_end, RemoteProcess in remote.ts) and gives it back with
 * each batch (end_kept). What it was chosen by can change between two
 * batches, and each part is handled where it can:
 * - Pending signals can change at any moment: anyone may send the
 *   process a signal, and a batch may queue one itself (a restore puts
 *   pending signals back). So the kept signal is looked for again before
 *   every batch, in the thread's queue and the process's (two
 *   PTRACE_PEEKSIGINFO, no file read), and chosen afresh if it waits in
 *   either. A signal that came after the look, or that the peeks cannot
 *   see (pending without its siginfo: RLIMIT_SIGPENDING reached, review
 *   r394 F1), the batch takes instead of its own end; batch_heard has the
 *   kernel put it back where it was (put_back_taken; a process's only
 *   on a kernel that requeues it there, Linux 5.17: requeue_keeps_queue)
 *   and ends the batch by another signal, chosen afresh.
 * - What the process catches changes only by rt_sigaction: a stopped
 *   process (a frozen application, a restore's seed) runs nothing of its
 *   own, and no process outside it shares its handlers (CLONE_SIGHAND
 *   needs CLONE_VM, which a snapshot refuses between processes,
 *   fdtable.ts); so only by one injected, which the caller sees in its own
 *   batches and then drops the choice (remote.ts endSignalChanged).
 * - A shadow stack (frame_ok) is the thread's, changed only by its own
 *   arch_prctl: injected, likewise seen by the caller.
 */

static uint64_t status_mask(const char* line, const char* field) {
  size_t n = strlen(field);
  if (strncmp(line, field, n) || line[n] != ':') return 0;
  return strtoull(line + n + 1, NULL, 16);
}

/* Reads /proc/PID/status whole into `buf` (NUL-terminated): one open,
 * reads until its end, one close, where stdio's fopen and fgets took a
 * stat and a read per kilobyte besides (the file is some 1.5 kB). Its
 * length, or -1. Once per batch, in the frozen window. */
static ssize_t read_status(pid_t tid, char* buf, size_t size) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/status", tid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  size_t len = 0;
  for (;;) {
    ssize_t n = read(fd, buf + len, size - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len += (size_t)n;
    if (len == size - 1) break;
  }
  close(fd);
  buf[len] = 0;
  return (ssize_t)len;
}

/* `taken`: a signal to count as pending (0: none), one the thread has
 * just taken out of its queue to be put back. */
static trace_batch_end choose_batch_end(pid_t tid, int taken) {
  trace_batch_end end = {SIGTRAP, 1};
  char small[8192];
  char* status = small;
  ssize_t len = read_status(tid, small, sizeof small);
  if (len < 0) return end;
  /* Longer (a Groups line of thousands): read again, whole. */
  char* large = NULL;
  if ((size_t)len == sizeof small - 1 && (large = malloc(1 << 20)) != NULL && read_status(tid, large, 1 << 20) >= 0) status = large;
  uint64_t caught = ~0ull, pending = ~0ull, shared = ~0ull;
  for (char* line = status; line && *line;) {
    char* next = strchr(line, '\n');
    if (next) *next++ = 0;
    if (!strncmp(line, "SigCgt:", 7)) caught = status_mask(line, "SigCgt");
    else if (!strncmp(line, "SigPnd:", 7)) pending = status_mask(line, "SigPnd");
    else if (!strncmp(line, "ShdPnd:", 7)) shared = status_mask(line, "ShdPnd");
    else if (!strncmp(line, "x86_Thread_features:", 20) && strstr(line, "shstk")) end.frame_ok = 0;
    line = next;
  }
  free(large);
  if (taken) pending |= 1ull << (taken - 1);
  static const int harmless[] = {SIGURG, SIGWINCH, SIGCHLD};
  for (size_t i = 0; i < sizeof harmless / sizeof *harmless; i++) {
    uint64_t bit = 1ull << (harmless[i] - 1);
    if (!((caught | pending | shared) & bit)) {
      end.sig = harmless[i];
      break;
    }
  }
  return end;
}

/* `known` (a choice of choose_batch_end for thread `tid`, kept since; sig
 * 0: none) if its signal is still pending nowhere, else NULL: chosen
 * afresh then. */
static const trace_batch_end* end_kept(pid_t tid, const trace_batch_end* known) {
  /* SIGTRAP is the fallback: every harmless signal caught, or the status
   * not read at all (then a guess, shadow stack included): chosen again
   * for every batch, as before choices were kept. */
  if (!known || !known->sig || known->sig == SIGTRAP) return NULL;
  return pending_in(tid, 0, known->sig) == 0 && pending_in(tid, 1, known->sig) == 0 ? known : NULL;
}

/* The kernel's x86-64 signal frame, as rt_sigreturn reads it at the stack
 * pointer less 8 (the return address a handler's ret took). */
typedef struct {
  uint64_t r8, r9, r10, r11, r12, r13, r14, r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags;
  uint16_t cs, gs, fs, ss;
  uint64_t err, trapno, oldmask, cr2, fpstate, reserved[8];
} kernel_sigcontext;

typedef struct {
  uint64_t pretcode;
  uint64_t uc_flags, uc_link;
  struct {
    uint64_t sp;
    int32_t flags, pad;
    uint64_t size;
  } uc_stack; /* filled by the batch code itself (sigaltstack) */
  kernel_sigcontext uc_mcontext;
  uint64_t uc_sigmask;
  unsigned char info[128];
} kernel_rt_sigframe;

_Static_assert(sizeof(kernel_sigcontext) == 256, "sigcontext layout");
_Static_assert(offsetof(kernel_rt_sigframe, uc_stack) == 24, "the batch code writes uc_stack at 24");
_Static_assert(sizeof(kernel_rt_sigframe) == 440, "rt_sigframe layout");

#define UC_FP_XSTATE 0x1
#define UC_SIGCONTEXT_SS 0x2
#define UC_STRICT_RESTORE_SS 0x4
#ifndef FP_XSTATE_MAGIC1
#define FP_XSTATE_MAGIC1 0x46505853U
#endif
#ifndef FP_XSTATE_MAGIC2
#define FP_XSTATE_MAGIC2 0x46505845U
#endif
/* Where the extended state goes in the frame (64-byte aligned, as xrstor
 * wants: the frame itself is). */
#define FRAME_FPSTATE 512
#define FXSAVE_SW_BYTES 464

/*
 * Writes at `frame` (TRACE_BATCH_FRAME_ROOM bytes, 64-byte aligned) the
 * signal frame that takes the thread back to `regs` (rewound: an
 * interrupted call runs again) with signal mask `mask` and its floating
 * point and vector state as it is now (the batch touches none of it): what
 * the batch code's tail returns onto when no tracer took it at its end.
 */
static int batch_frame(pid_t tid, uint64_t frame, const struct user_regs_struct* regs, uint64_t mask) {
  unsigned char buf[TRACE_BATCH_FRAME_ROOM] __attribute__((aligned(64)));
  memset(buf, 0, FRAME_FPSTATE);
  /* Room left for the magic word after it; a whole number of the
   * regset's 8-byte units, or the kernel refuses. */
  int xsize = trace_get_xstate(tid, buf + FRAME_FPSTATE, sizeof buf - FRAME_FPSTATE - 64);
  if (xsize < 0) return xsize;
  if (xsize < 576) return -EINVAL;
  /* The software bytes rt_sigreturn checks, sized to what was read. */
  uint32_t sw[4];
  memcpy(sw, buf + FRAME_FPSTATE + FXSAVE_SW_BYTES, sizeof sw);
  uint64_t xfeatures;
  memcpy(&xfeatures, buf + FRAME_FPSTATE + FXSAVE_SW_BYTES + 8, 8);
  uint32_t magic1 = FP_XSTATE_MAGIC1, extended = (uint32_t)xsize + 4, xstate_size = (uint32_t)xsize, magic2 = FP_XSTATE_MAGIC2;
  if (sw[0] != FP_XSTATE_MAGIC1) xfeatures = 3; /* x87 and SSE */
  memcpy(buf + FRAME_FPSTATE + FXSAVE_SW_BYTES, &magic1, 4);
  memcpy(buf + FRAME_FPSTATE + FXSAVE_SW_BYTES + 4, &extended, 4);
  memcpy(buf + FRAME_FPSTATE + FXSAVE_SW_BYTES + 8, &xfeatures, 8);
  memcpy(buf + FRAME_FPSTATE + FXSAVE_SW_BYTES + 16, &xstate_size, 4);
  memcpy(buf + FRAME_FPSTATE + xsize, &magic2, 4);
  kernel_rt_sigframe* f = (kernel_rt_sigframe*)buf;
  f->uc_flags = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS;
  kernel_sigcontext* c = &f->uc_mcontext;
  c->r8 = regs->r8, c->r9 = regs->r9, c->r10 = regs->r10, c->r11 = regs->r11;
  c->r12 = regs->r12, c->r13 = regs->r13, c->r14 = regs->r14, c->r15 = regs->r15;
  c->rdi = regs->rdi, c->rsi = regs->rsi, c->rbp = regs->rbp, c->rbx = regs->rbx;
  c->rdx = regs->rdx, c->rax = regs->rax, c->rcx = regs->rcx, c->rsp = regs->rsp;
  c->rip = regs->rip, c->eflags = regs->eflags;
  c->cs = (uint16_t)regs->cs, c->gs = (uint16_t)regs->gs, c->fs = (uint16_t)regs->fs, c->ss = (uint16_t)regs->ss;
  c->fpstate = frame + FRAME_FPSTATE;
  f->uc_sigmask = mask;
  size_t len = FRAME_FPSTATE + (size_t)xsize + 4;
  struct iovec local = {buf, len}, remote = {(void*)(uintptr_t)frame, len};
  ssize_t n = process_vm_writev(tid, &local, 1, &remote, 1, 0);
  if (n < 0) return fail();
  return (size_t)n == len ? 0 : -EFAULT;
}

/* Puts the end signal in the table's flags word (its second byte, which
 * the batch code gives tgkill). */
static int set_end_signal(pid_t tid, uint64_t table, int sig) {
  errno = 0;
  long word = ptrace(PTRACE_PEEKDATA, tid, (void*)(table + 24), 0);
  if (errno) return fail();
  word = (long)(((unsigned long)word & ~0xff00ul) | ((unsigned long)sig << 8));
  return ptrace(PTRACE_POKEDATA, tid, (void*)(table + 24), (void*)word) ? fail() : 0;
}

/* The test-only points of src/killpoint.ts in native code, at instants no
 * point of its TypeScript can reach (threads running injected code):
 * APPSHOT_TEST_KILL_AT=NAME has appshot SIGKILL itself here, and
 * APPSHOT_TEST_STOP_AT=NAME stop itself (SIGSTOP), so that a test can do
 * something to the threads while they run (kill their process) and then
 * continue it. */
static void kill_point(const char* name) {
  const char* at = getenv("APPSHOT_TEST_KILL_AT");
  if (at && strcmp(at, name) == 0) kill(getpid(), SIGKILL);
  at = getenv("APPSHOT_TEST_STOP_AT");
  if (at && strcmp(at, name) == 0) kill(getpid(), SIGSTOP);
}

/* Waits for the thread, which runs the batch code still (a batch that
 * did not end in time), to stop: interrupted, so that its registers and
 * mask can be put back. Signals it takes meanwhile are set aside as the
 * batch's loop does (stops), the others left to the batch's error. 0 once
 * it is stopped, else -errno (-ETIMEDOUT, -ESRCH: it is gone). */
static int stop_running_batch(pid_t tid, unsigned* stops, int wait_ms, int interrupted) {
  if (!interrupted && ptrace(PTRACE_INTERRUPT, tid, 0, 0)) return fail();
  for (int tries = 0; tries < 16; tries++) {
    trace_report rep;
    int rc = trace_wait(tid, wait_ms, &rep);
    if (rc) return rc;
    if (rep.kind == TRACE_NONE) return -ETIMEDOUT;
    if (rep.kind == TRACE_EXITED) return -ESRCH;
    if (rep.kind == TRACE_SIGNAL && is_stop_signal(rep.sig)) {
      *stops |= 1u << rep.sig;
      if (ptrace(PTRACE_CONT, tid, 0, 0) || ptrace(PTRACE_INTERRUPT, tid, 0, 0)) return fail();
      continue;
    }
    return 0; /* stopped: at the interrupt, or at a signal */
  }
  return -EINTR;
}

/* One thread's batch, from its start to its end: what the tracer keeps of
 * it meanwhile. trace_inject_batch_framed runs one; trace_inject_batches
 * runs several at once, their stops overlapping. */
typedef struct {
  pid_t tid;
  uint64_t code, table;
  size_t stopped_at, trapped_at;
  trace_batch_end end;
  /* Where the thread goes back to, by itself or by us: an interrupted
   * call made to run again. */
  struct user_regs_struct back;
  uint64_t mask;
  unsigned stops;
  /* An end signal of the process's own that was pending (or came
   * meanwhile), taken instead of ours, where no other end signal was free
   * to put it back at once (put_back_taken): set aside and queued again
   * after. */
  int foreign;
  siginfo_t foreign_info[2]; /* the thread's queue's and the process's */
  int foreign_to_process[2];
  /* One pending before the batch is taken at its start, the thread's own
   * first: whether it has one says which queue the first came from. */
  int own_pending;
  int armed;   /* its registers and mask are the batch's: to be put back */
  int running; /* the thread runs the batch code, not stopped */
  /* Given up while running: interrupted already, and how long its stop is
   * waited for (0: 10 s), from one deadline for all of a round's. */
  int interrupted;
  int stop_wait_ms;
  int tries;   /* resumes so far */
  int rc;
} batch_run;

/* Points the stopped thread at the batch code, its signals blocked but the
 * end signal (`end`, if not NULL: chosen already, and pending in none of
 * the queues the thread takes from); 0, or -errno with the thread as it
 * was. */
static int batch_arm(batch_run* b, pid_t tid, uint64_t code, uint64_t table, uint64_t frame, const trace_batch_end* end) {
  memset(b, 0, sizeof *b);
  b->tid = tid;
  b->code = code;
  b->table = table;
  b->rc = -EINTR;
  struct user_regs_struct saved, r;
  int rc = trace_get_regs(tid, &saved);
  if (rc) return rc;
  size_t size;
  trace_batch_code(&size, &b->stopped_at);
  b->trapped_at = (size_t)(appshot_batch_trapped - appshot_batch_code);
  b->end = end ? *end : choose_batch_end(tid, 0);
  if ((rc = set_end_signal(tid, table, b->end.sig))) return rc;
  if ((rc = trace_get_sigmask(tid, &b->mask))) return rc;
  b->back = saved;
  trace_rewind(&b->back);
  r = saved;
  r.rip = code;
  r.rbx = table;
  r.r14 = 0;
  if (frame && b->end.frame_ok && batch_frame(tid, frame, &b->back, b->mask) == 0) r.r14 = frame;
  r.orig_rax = (unsigned long)-1;
  /* Every signal blocked, as for a single call (trace_inject), but the
   * one that ends the batch. */
  uint64_t all_but_end = ~0ull & ~(1ull << (b->end.sig - 1));
  if ((rc = trace_set_sigmask(tid, all_but_end))) return rc;
  if ((rc = trace_set_regs(tid, &r))) {
    trace_set_sigmask(tid, b->mask);
    return rc;
  }
  b->own_pending = pending_for_thread(tid, b->end.sig);
  b->armed = 1;
  return 0;
}

/* Lets the armed thread run (on) in the batch code: 0, or -errno. */
static int batch_resume(batch_run* b) {
  if (ptrace(PTRACE_CONT, b->tid, 0, 0)) return fail();
  b->tries++;
  b->running = 1;
  return 0;
}

/*
 * Whether this kernel queues a signal a tracer gives back (PTRACE_CONT
 * with it, the thread blocking it) in the queue the thread took it from:
 * the process's for one sent to the process. So since Linux 5.17 (commits
 * 5768d8906bc2 "signal: Requeue signals in the appropriate queue" and
 * b171f667f378 "signal: Requeue ptrace signals"); before, ptrace_signal
 * queued it to the thread's own queue whatever its origin, and a process's
 * signal put back so became the thread's alone, kept from the other
 * threads (review r417 F1). Tried, not judged by the kernel's version
 * (a distribution may have the change backported): once per appshot
 * process, on a child of its own blocking all but SIGURG, sent a SIGURG to
 * the process and given it back so; then where it waits (/proc status).
 * 1 if in the process's queue; 0 if not; -1 if the trial failed (the
 * caller then assumes the old way: put_back_taken only for a thread's own
 * signal).
 */
static int probe_requeue_keeps_queue(void) {
  pid_t parent = getpid();
  /* A raw clone, every signal blocked across it: not fork(), whose atfork
   * handlers (libc's, libuv's, a preload library's wrapper when appshot
   * runs inside an application) and the parent's signal handlers must not
   * run in a child of a multi-threaded process (review r436 B2). */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pid_t child = (pid_t)syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);
  if (child != 0) pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (child < 0) return -1;
  if (child == 0) {
    /* Async-signal-safe calls only: the parent has other threads. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    sigset_t all_but_urg;
    sigfillset(&all_but_urg);
    sigdelset(&all_but_urg, SIGURG);
    sigprocmask(SIG_SETMASK, &all_but_urg, NULL);
    for (;;) pause();
  }
  int kept = -1;
  trace_report rep;
  if (ptrace(PTRACE_SEIZE, child, 0, (void*)(long)PTRACE_O_EXITKILL) == 0 && kill(child, SIGURG) == 0 &&
      trace_wait(child, 5000, &rep) == 0 && rep.kind == TRACE_SIGNAL && rep.sig == SIGURG &&
      trace_set_sigmask(child, ~0ull) == 0 && ptrace(PTRACE_INTERRUPT, child, 0, 0) == 0 &&
      ptrace(PTRACE_CONT, child, 0, (void*)(long)SIGURG) == 0 && trace_wait(child, 5000, &rep) == 0 &&
      rep.kind == TRACE_STOP) {
    char status[8192];
    uint64_t bit = 1ull << (SIGURG - 1), shared = 0, own = 0;
    if (read_status(child, status, sizeof status) > 0) {
      for (char* line = status; line && *line;) {
        char* next = strchr(line, '\n');
        if (next) *next++ = 0;
        if (!strncmp(line, "ShdPnd:", 7)) shared = status_mask(line, "ShdPnd");
        else if (!strncmp(line, "SigPnd:", 7)) own = status_mask(line, "SigPnd");
        line = next;
      }
      kept = (shared & bit) && !(own & bit);
    }
  }
  kill(child, SIGKILL);
  for (;;) {
    int st;
    pid_t got = waitpid(child, &st, __WALL);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0 || WIFEXITED(st) || WIFSIGNALED(st)) break;
  }
  return kept;
}

static int requeue_keeps_queue(void) {
  static int known = -1; /* a race of two first calls only tries twice */
  int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
  if (k < 0) {
    /* Only a definite answer is kept: a trial that failed (no process
     * left to fork, a timeout under load) assumes the old way this time
     * and is tried again next time, not pinned for the engine's life
     * (review r436 B1); but not more than three times in all, as each
     * may cost seconds while an application is held (review r438 F4). */
    static int failed;
    if (__atomic_load_n(&failed, __ATOMIC_RELAXED) >= 3) return 0;
    k = probe_requeue_keeps_queue();
    if (k < 0) {
      __atomic_add_fetch(&failed, 1, __ATOMIC_RELAXED);
      return 0;
    }
    __atomic_store_n(&known, k, __ATOMIC_RELAXED);
  }
  return k;
}

/*
 * An end signal of the process's own that the thread took while armed
 * (pending before the batch, where the queues peeked at did not list it,
 * or come since), put back by the kernel itself, exactly where it came
 * from and with its siginfo: the thread, stopped at its delivery, is let
 * go with it while it blocks every signal, which has the kernel queue it
 * again as it took it (ptrace_signal: to the thread's own queue or to its
 * process's, the latter since Linux 5.17: requeue_keeps_queue), and then
 * stops at once at the interrupt asked first, before any instruction of
 * its own. take_back_signal can only guess the
 * queue of a signal the kernel kept without its siginfo (RLIMIT_SIGPENDING
 * reached, review r394 F1) and names appshot as the sender of one that
 * had none. The batch then ends by `next` (its table and mask changed
 * to it), pending nowhere. 0, or -errno; *let_go says whether the thread
 * was let go with the signal (if not, its mask is the batch's again and
 * the signal still to be put back).
 */
static int put_back_taken(batch_run* b, int sig, trace_batch_end next, int* let_go) {
  uint64_t all_but_end = ~0ull & ~(1ull << (b->end.sig - 1));
  *let_go = 0;
  int rc = trace_set_sigmask(b->tid, ~0ull);
  if (rc) return rc;
  if (ptrace(PTRACE_INTERRUPT, b->tid, 0, 0) || ptrace(PTRACE_CONT, b->tid, 0, (void*)(long)sig)) {
    rc = fail();
    trace_set_sigmask(b->tid, all_but_end);
    return rc;
  }
  /* Let go: from here on, whatever becomes of it, the signal is the
   * kernel's again. */
  *let_go = 1;
  b->running = 1;
  b->interrupted = 1;
  if ((rc = stop_running_batch(b->tid, &b->stops, 10000, 1))) {
    /* Waited 10 s for it already: batch_disarm only looks once more,
     * not another 10 s (in a round, with every other thread's reports
     * waiting behind it; review r417 F7). */
    if (rc == -ETIMEDOUT) b->stop_wait_ms = 1;
    return rc;
  }
  b->running = 0;
  b->interrupted = 0;
  if ((rc = set_end_signal(b->tid, b->table, next.sig))) return rc;
  if ((rc = trace_set_sigmask(b->tid, ~0ull & ~(1ull << (next.sig - 1))))) return rc;
  b->end = next;
  b->own_pending = pending_for_thread(b->tid, next.sig);
  return 0;
}

/* What a report of the thread says of its batch: 1 when it is over (b->rc
 * 0, or why it failed), 0 when the thread is to be resumed again (a signal
 * set aside, an interrupt's trap). */
static int batch_heard(batch_run* b, const trace_report* rep) {
  b->running = 0;
  if (rep->kind == TRACE_EXITED) {
    b->rc = -ESRCH;
    b->armed = 0; /* nothing left to put back */
    return 1;
  }
  if (rep->kind == TRACE_SIGNAL && (rep->sig == b->end.sig || rep->sig == SIGTRAP)) {
    struct user_regs_struct at;
    siginfo_t si;
    if ((b->rc = trace_get_regs(b->tid, &at)) || (b->rc = trace_get_siginfo(b->tid, &si))) return 1;
    /* Ours, at the end of the code: sent by the thread to itself, or
     * the int3's trap that stands in for a tgkill that failed (a
     * seccomp filter). Done. Ours only if the tgkill sent one (it
     * returned 0): after one that failed, a signal taken there, with
     * siginfo or without, is the application's, come during that call
     * (review r417 F2). */
    if ((rep->sig == b->end.sig && at.rip == b->code + b->stopped_at && at.rax == 0 && (infoless(&si) || (si.si_code == SI_TKILL && si.si_pid == sender_tgid(b->tid, b->table)))) ||
        (rep->sig == SIGTRAP && at.rip == b->code + b->trapped_at + 1 && si.si_code == SI_KERNEL)) {
      b->rc = 0;
      return 1;
    }
    if (rep->sig != b->end.sig) {
      /* A trap elsewhere in the code (SIGTRAP is blocked but for the
       * end): a fault, as below. */
      b->rc = -EFAULT;
      return 1;
    }
    /* Taken past the batch's own tgkill, which succeeded: this one
     * reached the thread's queue in the instant before ours, and the
     * kernel kept the two as one. Every call has run; resumed, the
     * thread would go on to the code's tail, back into its own code (and
     * run it again after the batch's rewind, review r417 F3): the batch
     * is over, however the signal is put back. */
    int past_tgkill = at.rip == b->code + b->stopped_at && at.rax == 0;
    /* The queue it came from. Taken at the start (nothing of the code
     * run yet): the thread's own if it had one, else the process's. Come
     * meanwhile (or not told): by its si_code. */
    int at_start = at.rip == b->code && b->own_pending >= 0;
    int to_process = at_start ? !b->own_pending : sent_to_process(&si);
    /* Put back where it was by the kernel, if another end signal is free
     * and the kernel queues it again there: always since Linux 5.17
     * (requeue_keeps_queue), else only a thread's own. Even if the end
     * it leaves free is SIGTRAP (SIGWINCH and SIGCHLD caught, or the
     * status unread), whose default action kills the process should
     * appshot die in the batch (review r417 F4): deliberately, as a
     * signal put back stays the kernel's then, where one set aside dies
     * with appshot; and once back in a queue, taken back either way, it
     * makes SIGTRAP the next batch's end all the same. */
    trace_batch_end next = choose_batch_end(b->tid, rep->sig);
    if (next.sig != b->end.sig && (!to_process || requeue_keeps_queue())) {
      int let_go;
      int rc = put_back_taken(b, rep->sig, next, &let_go);
      if (rc == 0 && past_tgkill) {
        b->rc = 0;
        return 1;
      }
      if (rc == 0) {
        b->rc = -EINTR;
        return 0;
      }
      if (let_go) {
        b->rc = rc;
        return 1;
      }
    }
    if (b->foreign < 2) {
      if (at_start) b->own_pending = 0;
      b->foreign_to_process[b->foreign] = to_process;
      b->foreign_info[b->foreign++] = si;
    }
    /* Queued again by batch_disarm (take_back_signal). */
    if (past_tgkill) {
      b->rc = 0;
      return 1;
    }
    b->rc = -EINTR;
    return 0;
  }
  /* A stop signal that was pending before (job control), set aside and
   * queued again after, as in trace_inject. */
  if (rep->kind == TRACE_SIGNAL && is_stop_signal(rep->sig)) {
    b->stops |= 1u << rep->sig;
    b->rc = -EINTR;
    return 0;
  }
  /* A fault in the code (SIGSEGV, SIGBUS...): said as such, and never
   * resumed past (the kernel has made its disposition the default). */
  if (rep->kind == TRACE_SIGNAL) {
    b->rc = -EFAULT;
    return 1;
  }
  /* An interrupt's trap, a job-control stop reported again, a fork's
   * event: resume once more. Anything else is an error. */
  b->rc = -EINTR;
  return rep->kind != TRACE_STOP && rep->kind != TRACE_GROUP_STOP && rep->kind != TRACE_EVENT;
}

/* Puts the thread back as it was before batch_arm (the batch's results
 * are in its table); returns the batch's rc, or the first error of that. */
static int batch_disarm(batch_run* b) {
  if (!b->armed) return b->rc;
  /* Still in the batch code (it did not end in time): stopped first, or
   * its registers and mask could not be put back, and it would go on to
   * its end, unwatched. */
  if (b->running) stop_running_batch(b->tid, &b->stops, b->stop_wait_ms > 0 ? b->stop_wait_ms : 10000, b->interrupted);
  take_back_stops(b->tid, b->stops);
  for (int i = 0; i < b->foreign; i++) take_back_signal(b->tid, &b->foreign_info[i], b->foreign_to_process[i]);
  int rc = b->rc;
  int rc3 = trace_set_sigmask(b->tid, b->mask);
  if (!rc) rc = rc3;
  int rc2 = trace_set_regs(b->tid, &b->back);
  b->armed = 0;
  return rc ? rc : rc2;
}

int trace_inject_batch_framed(pid_t tid, uint64_t code, uint64_t table, uint64_t frame, trace_batch_end* end) {
  batch_run b;
  int rc = batch_arm(&b, tid, code, table, frame, end_kept(tid, end));
  /* What was used, for the next batch (sig 0 if batch_arm failed before
   * it chose: nothing to keep). */
  if (end) *end = b.end;
  if (rc) return rc;
  while (b.tries < 16) {
    if ((b.rc = batch_resume(&b))) break;
    /* The thread runs the batch, its registers and mask the batch's. */
    if (b.tries == 1) kill_point("batch: running");
    trace_report rep;
    if ((b.rc = trace_wait(tid, 10000, &rep))) break;
    if (rep.kind == TRACE_NONE) {
      b.rc = -ETIMEDOUT;
      break;
    }
    if (batch_heard(&b, &rep)) break;
  }
  /* Changed if its first was taken (put_back_taken). */
  if (end) *end = b.end;
  return batch_disarm(&b);
}

int trace_inject_batches(trace_batch_job* jobs, size_t n, const trace_batch_end* known) {
  if (n == 0) return 0;
  batch_run* runs = calloc(n, sizeof *runs);
  pid_t* waiting = calloc(n, sizeof *waiting);
  if (!runs || !waiting) {
    free(runs);
    free(waiting);
    return -ENOMEM;
  }
  /* Every thread pointed at its batch and let go before any is waited
   * for: the threads run their batches side by side, and the stops come
   * in whatever order they come. */
  size_t pending = 0;
  /* The end signal is chosen by what the process catches and has pending
   * (`known`, if its signal is not pending in the process's queue now;
   * else its /proc status, read once), and kept for each thread that has
   * not got it pending itself (the thread's own queue, peeked at). */
  trace_batch_end shared = {0, 0};
  if (known && known->sig && pending_in(jobs[0].tid, 1, known->sig) == 0) shared = *known;
  for (size_t i = 0; i < n; i++) {
    batch_run* b = &runs[i];
    const trace_batch_end* end = NULL;
    if (shared.sig && pending_for_thread(jobs[i].tid, shared.sig) == 0) end = &shared;
    if ((b->rc = batch_arm(b, jobs[i].tid, jobs[i].code, jobs[i].table, 0, end))) continue;
    if (!shared.sig) shared = b->end;
    if ((b->rc = batch_resume(b))) continue;
    waiting[pending++] = b->tid;
  }
  /* A name of its own: 'batch: running' is reached first by the single
   * batches a restore runs before its rounds. */
  if (pending) kill_point("batches: running at once");
  while (pending) {
    trace_report rep;
    /* 10 s without a stop from any of them: the ones still running are
     * given up (stopped by batch_disarm, their batches failed). */
    trace_wait_any(waiting, pending, 10000, &rep);
    if (rep.kind == TRACE_NONE) {
      /* All interrupted at once, their stops waited for against one
       * deadline below: one by one, 10 s each, a round of 64 threads that
       * cannot stop (a frozen cgroup) would hold the tracer for minutes. */
      for (size_t i = 0; i < n; i++)
        if (runs[i].running) {
          runs[i].rc = -ETIMEDOUT;
          runs[i].interrupted = ptrace(PTRACE_INTERRUPT, runs[i].tid, 0, 0) == 0;
        }
      break;
    }
    batch_run* b = NULL;
    for (size_t i = 0; i < n && !b; i++)
      if (runs[i].tid == rep.tid && runs[i].running) b = &runs[i];
    if (!b) continue; /* not a report trace_wait_any gives: only ours are waited for */
    int over = batch_heard(b, &rep);
    if (!over && b->tries >= 16) over = 1;
    if (!over && (b->rc = batch_resume(b))) over = 1;
    if (over)
      for (size_t k = 0; k < pending; k++)
        if (waiting[k] == b->tid) {
          waiting[k] = waiting[--pending];
          break;
        }
  }
  int first = 0;
  struct timespec given_up;
  clock_gettime(CLOCK_MONOTONIC, &given_up);
  for (size_t i = 0; i < n; i++) {
    /* (Not one whose put-back waited for its stop in vain already.) */
    if (runs[i].running && !runs[i].stop_wait_ms) {
      struct timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      long spent = (now.tv_sec - given_up.tv_sec) * 1000 + (now.tv_nsec - given_up.tv_nsec) / 1000000;
      runs[i].stop_wait_ms = spent < 10000 ? (int)(10000 - spent) : 1;
    }
    jobs[i].rc = batch_disarm(&runs[i]);
    if (jobs[i].rc && !first) first = jobs[i].rc;
  }
  free(runs);
  free(waiting);
  return first;
}

int trace_inject_batch(pid_t tid, uint64_t code, uint64_t table) { return trace_inject_batch_framed(tid, code, table, 0, NULL); }

int trace_inject_batch_clones(pid_t tid, uint64_t code, uint64_t table, trace_batch_end* end) {
  /* Without PTRACE_O_TRACECLONE the kernel makes no clone event, and
   * CLONE_PTRACE alone has each new thread traced as the caller is. */
  long quiet = (SEIZE_OPTIONS & ~PTRACE_O_TRACECLONE) | PTRACE_O_EXITKILL;
  if (ptrace(PTRACE_SETOPTIONS, tid, 0, (void*)quiet)) return fail();
  int rc = trace_inject_batch_framed(tid, code, table, 0, end);
  int rc2 = trace_kill_on_exit(tid);
  return rc ? rc : rc2;
}

/* A copy-on-write copy of the stopped process `tid` belongs to (snapshot
 * --leave-running, src/snapshot/cowcapture.ts): clone(flags) run in
 * thread `tid`, which is traced with PTRACE_O_TRACEFORK, so that the new
 * process is traced by us from its birth and stops before its first
 * instruction (PTRACE_EVENT_STOP: it was seized). It is waited for in
 * that stop here and set to die with us (PTRACE_O_EXITKILL): let go, it
 * would run the application's code as a second instance of it. *ret: the
 * call's result (the child's PID in the caller's namespace, or -errno);
 * *child: its PID in ours, 0 if there is none. */
int trace_fork_stopped(pid_t tid, uint64_t syscall_insn, unsigned long flags, long* ret, pid_t* child) {
  long args[6] = {(long)flags, 0, 0, 0, 0, 0};
  *child = 0;
  /* The child takes its tracing options from the thread as it is forked:
   * with PTRACE_O_EXITKILL, it dies with us even before it is waited for
   * below. The thread has its own options back after (those trace_seize
   * set: no process with a seccomp filter is forked, so none had them
   * suspended). */
  int rc = trace_kill_on_exit(tid);
  if (rc) return rc;
  rc = trace_inject_forking(tid, syscall_insn, SYS_clone, args, ret, child);
  int back = trace_keep_on_exit(tid);
  if (!rc) rc = back;
  if (*child <= 0) return rc;
  /* Its first stop may come before or after its creator's event. */
  trace_report rep;
  int wrc = trace_wait(*child, 10000, &rep);
  if (!wrc && (rep.kind == TRACE_NONE || rep.kind == TRACE_EXITED)) wrc = rep.kind == TRACE_NONE ? -ETIMEDOUT : -ESRCH;
  if (!wrc) wrc = trace_kill_on_exit(*child);
  if (wrc || rc) {
    trace_end_child(*child);
    *child = 0;
    return rc ? rc : wrc;
  }
  return 0;
}

/* Kills a child made by trace_fork_stopped and waits until it is dead: its
 * tracer's wait (ours) hands it to its real parent, which reaps it. */
int trace_end_child(pid_t child) {
  if (syscall(SYS_kill, child, SIGKILL) && errno != ESRCH) return fail();
  for (int tries = 0; tries < 100; tries++) {
    trace_report rep;
    int rc = trace_wait(child, 10000, &rep);
    if (rc == -ECHILD) return 0;
    if (rc) return rc;
    if (rep.kind == TRACE_EXITED) return 0;
    if (rep.kind == TRACE_NONE) return -ETIMEDOUT;
  }
  return -EINTR;
}
