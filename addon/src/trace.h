/* ptrace primitives for the snapshot and restore drivers.
 *
 * Every function here must be called from the one OS thread that seized the
 * tracee (ptrace belongs to the attaching thread); the addon calls them all
 * from Node's main thread. Plain C so that a future restorer binary can use
 * them too. Functions return 0 or a value, and -errno on failure. */
#ifndef APPSHOT_TRACE_H
#define APPSHOT_TRACE_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

/* What one waitpid() on the tracees reported. */
typedef enum {
  TRACE_NONE = 0,     /* nothing before the deadline */
  TRACE_STOP,         /* a stop we asked for (PTRACE_INTERRUPT, new task) */
  TRACE_GROUP_STOP,   /* the task is in a job-control stop (SIGSTOP &c) */
  TRACE_SIGNAL,       /* signal-delivery-stop: `sig` is about to be delivered */
  TRACE_EVENT,        /* fork/vfork/clone/exec event stop: `event`, `msg` */
  TRACE_SYSCALL,      /* a syscall stop (only during injection) */
  TRACE_EXITED,       /* the task is gone: `status` is its wait status */
} trace_kind;

typedef struct {
  trace_kind kind;
  pid_t tid;
  int sig;
  int event;
  unsigned long msg;
  int status;
} trace_report;

/* With exit_kill, the tracee (and every child and thread it makes while
 * traced) is killed if we die before detaching it: a process being
 * restored must not run on with half its state. A snapshot seizes without
 * it: an application we stop must outlive us. */
int trace_seize(pid_t tid, int exit_kill);
/* Turns exit-kill off once the restore is committed: from then on our
 * death detaches the tracee, which runs on. */
int trace_keep_on_exit(pid_t tid);
/* The options trace_seize(tid, 1) sets, set again (a thread made by
 * trace_inject_batch_clones lacks PTRACE_O_TRACECLONE). */
int trace_kill_on_exit(pid_t tid);
int trace_interrupt(pid_t tid);
/* Waits for one report from any tracee, or from `tid` if > 0, for at most
 * timeout_ms (0: do not wait). */
int trace_wait(pid_t tid, int timeout_ms, trace_report* out);

/* As trace_wait, for any of `tids` only: never another child of this
 * process (a resident engine's children are Node's too, whose exit
 * statuses a wait for any child would take from it). */
int trace_wait_any(const pid_t* tids, size_t n, int timeout_ms, trace_report* out);
int trace_cont(pid_t tid, int sig);
int trace_detach(pid_t tid, int sig);

int trace_get_regs(pid_t tid, struct user_regs_struct* regs);
int trace_set_regs(pid_t tid, const struct user_regs_struct* regs);
/* The extended (XSAVE) state; returns its size. */
int trace_get_xstate(pid_t tid, void* buf, size_t size);
int trace_set_xstate(pid_t tid, void* buf, size_t size);
int trace_get_sigmask(pid_t tid, uint64_t* mask);
int trace_set_sigmask(pid_t tid, uint64_t mask);
int trace_get_siginfo(pid_t tid, void* info /* 128 bytes */);
/* Pending signals without dequeuing them: up to max siginfos (128 bytes
 * each) of the thread's own queue, or the process's if shared, from the
 * from-th on. */
int trace_peek_siginfo(pid_t tid, int shared, uint64_t from, void* buf, int max);

typedef struct {
  uint64_t rseq_abi_pointer;
  uint32_t rseq_abi_size;
  uint32_t signature;
  uint32_t flags;
  uint32_t pad;
} trace_rseq;
int trace_get_rseq(pid_t tid, trace_rseq* out);
int trace_get_robust_list(pid_t tid, uint64_t* head, uint64_t* len);

/* The seccomp filters of a stopped thread (PTRACE_SECCOMP_GET_FILTER; needs
 * CAP_SYS_ADMIN, and a tracer that runs under no seccomp filter itself).
 * Filter `index` counts from the oldest (0), the order of installation. With buf NULL, returns the
 * program's length in instructions; else copies up to `count` instructions
 * (8 bytes each) and returns the length. -ENOENT past the oldest. */
long trace_seccomp_filter(pid_t tid, unsigned long index, void* buf, unsigned long count);
/* The flags the filter was installed with (SECCOMP_FILTER_FLAG_LOG is the
 * only one the kernel keeps). */
int trace_seccomp_flags(pid_t tid, unsigned long index, uint64_t* flags);
/* While set, the thread's seccomp filters do not apply to it: system calls
 * injected into it cannot be refused or kill it. Needs CAP_SYS_ADMIN; ends
 * with the trace, or with the next PTRACE_SETOPTIONS (trace_keep_on_exit).
 * exit_kill: keep PTRACE_O_EXITKILL as trace_seize set it. */
int trace_suspend_seccomp(pid_t tid, int exit_kill);

/* Makes the stopped thread `tid` run one system call at `syscall_insn` (the
 * address of a `syscall` instruction in the tracee) and stop again; its
 * registers are restored afterwards, except that a system call the thread
 * had been interrupted in is rewound to restart (see trace_rewind). */
int trace_inject(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret);
/* trace_inject; *forked (if not NULL, and set only then) the PID of the
 * task a fork or clone event of the call announced. */
int trace_inject_forking(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret, pid_t* forked);
/* A copy-on-write copy of the process of stopped thread `tid`, stopped at
 * its birth, traced by us and dying with us (trace.c). */
int trace_fork_stopped(pid_t tid, uint64_t syscall_insn, unsigned long flags, long* ret, pid_t* child);
/* Kills a child made by trace_fork_stopped and waits for its death. */
int trace_end_child(pid_t child);
/* The same for a seed that a restore rebuilds: the caller must have blocked
 * all its signals (the restore driver does when it seizes a seed, and its
 * children inherit the mask), and its registers are the restore's to
 * overwrite, so neither is saved or put back, and one single-step over the instruction replaces
 * the entry and exit stops. Half the round trips of trace_inject. Not for
 * fork or clone (a stepped fork's child would inherit the trap flag). */
int trace_inject_seed(pid_t tid, uint64_t syscall_insn, long nr, const long args[6], long* ret);

/* The position-independent code that runs a batch of system calls inside
 * a thread (trace.c): its bytes, its size, and the offset at which it
 * stops itself when done. */
const unsigned char* trace_batch_code(size_t* size, size_t* stopped_at);

/* Runs the batch whose table is at `table` in the thread, with the code
 * copied at `code`, in one stop; the results are in the table. The
 * thread's registers and signal mask are as they were after. */
int trace_inject_batch(pid_t tid, uint64_t code, uint64_t table);

/* Bytes the batch's signal frame needs in the process (64-byte aligned):
 * the frame, and the largest x86 extended state (AMX's) after it. */
#define TRACE_BATCH_FRAME_ROOM 16384

/* The signal that ends a batch in a thread, and whether the thread may go
 * back on its own through the batch's frame (trace.c, choose_batch_end):
 * chosen from the thread's /proc status, kept by the caller from one batch
 * to the next. sig 0: not chosen yet. */
typedef struct {
  int sig;
  int frame_ok;
} trace_batch_end;

/* trace_inject_batch, with TRACE_BATCH_FRAME_ROOM bytes at `frame` (0:
 * none) for a signal frame that takes the thread back to where it was on
 * its own should the tracer die while it runs the batch. `end` (may be
 * NULL): the end chosen for this thread by an earlier batch, kept unless
 * its signal is pending now; set to the one this batch used. The caller
 * drops it (sig 0) after any call that changes the process's handlers or
 * the thread's shadow stack (see trace.c). */
int trace_inject_batch_framed(pid_t tid, uint64_t code, uint64_t table, uint64_t frame, trace_batch_end* end);

/* One thread's batch of trace_inject_batches: its code and table as for
 * trace_inject_batch; rc, set by the call, as that function returns. */
typedef struct {
  pid_t tid;
  uint64_t code;
  uint64_t table;
  int rc;
} trace_batch_job;

/* trace_inject_batch in each of `n` stopped threads at once: all are let
 * go into their batches before any is waited for, so that their stops
 * overlap (one scheduler round trip for all, not one each). Each thread
 * is put back as trace_inject_batch leaves it, whatever became of the
 * others; a thread that died has rc -ESRCH. All threads of one process
 * (the signal that ends each batch is chosen once, by the process's
 * dispositions and pending signals). Without the frame of
 * trace_inject_batch_framed: for threads that die with the tracer (a
 * restore's, seized with exit-kill), where it serves nothing, and
 * which would need one of its own each. `known` (may be NULL): an end
 * chosen for a thread of the process by an earlier batch (its signal is
 * what the process catches that counts here). Returns 0, or the first
 * job's error. */
int trace_inject_batches(trace_batch_job* jobs, size_t n, const trace_batch_end* known);

/* The same for a batch of clone(CLONE_THREAD | CLONE_PTRACE) calls run in
 * a restore's thread (seized with exit-kill, seccomp not suspended): for
 * the batch, the thread's PTRACE_O_TRACECLONE is off, so that a clone
 * does not stop it with PTRACE_EVENT_CLONE. Each new thread is traced
 * nonetheless, by CLONE_PTRACE: from its creation, with the thread's
 * options (exit-kill too), and it stops before its first instruction, as
 * a thread seized by PTRACE_O_TRACECLONE does (trace_wait reports it). The
 * whole batch takes one stop, where each clone alone took three. The
 * thread's options are as before after; the new threads' are set by
 * trace_kill_on_exit. `end`: as for trace_inject_batch_framed. */
int trace_inject_batch_clones(pid_t tid, uint64_t code, uint64_t table, trace_batch_end* end);

/* A thread interrupted inside a system call holds -ERESTART* in rax; these
 * registers, set before it resumes, make it issue the call again as the
 * kernel would have. Returns 1 if they changed. */
int trace_rewind(struct user_regs_struct* regs);

#endif
