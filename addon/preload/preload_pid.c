/*
 * Process and thread ids: getpid/gettid/getppid, fork/vfork/clone, the wait
 * family, signals, process groups and sessions, and the calls that name a
 * process to act on (sched_*, priorities, prlimit, pidfd, process_vm_*).
 *
 * The model is that of a PID namespace: the application's init is virtual
 * PID 1, processes outside the application show up as 0, and a process
 * cannot be reached by an id the application was not given.
 */
#include "preload.h"

#include <linux/capability.h>
#include <linux/futex.h>
#include <linux/nsfs.h>
#include <linux/perf_event.h>
#include <linux/sched.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <linux/sockios.h> /* FIOSETOWN, SIOCSPGRP... */
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <pty.h>
#include <termios.h>
#include <utmp.h>

#define VINIT 1 /* the application's init */

static inline int raw_err(long r) { return r < 0 && r > -4096; }
static inline pid_t self_spid(void) { return (pid_t)SYS0(getpid); }

/* A system PID that the caller just learned from the kernel (a waited-for
 * child, a new child of an unwrapped spawn): it is ours by definition. */
static pid_t adopt(pid_t sid) {
  int32_t v = appshot_map_system(g_h, APPSHOT_PID, sid, 0, 0);
  return v >= 0 ? v : sid;
}

/* Copies n bytes at the caller's address src into dst as the kernel reads
 * its arguments: 0; -EFAULT when the address does not hold them all (a
 * plain read would kill the program with SIGSEGV where the kernel answers
 * EFAULT); another -errno when the system refuses the copy itself (a
 * seccomp filter may forbid process_vm_readv), for the caller to decide. */
long copy_in(void *dst, const void *src, size_t n) {
  struct iovec here = {dst, n}, there = {(void *)src, n};
  long r = SYS6(process_vm_readv, SYS0(getpid), &here, 1, &there, 1, 0);
  if (r == (long)n) return 0;
  return r >= 0 || r == -EFAULT ? -EFAULT : r;
}

/* copy_in, with no system call for memory that is certainly there: the
 * calling thread's stack between this frame and the page of its return
 * address (contiguous, and in use: a caller's local sockaddr or msghdr
 * is most often there). Everything else costs copy_in's two system calls
 * (a socket call's address on the heap: bench). Not inlined: its own
 * frame is what it measures from. */
NOINLINE long read_in(void *dst, const void *src, size_t n) {
  volatile char here = 0;
  uintptr_t at = (uintptr_t)&here;
  uintptr_t ret = (uintptr_t)__builtin_frame_address(0) + 2 * sizeof(void *); /* past the return address */
  uintptr_t lo = at & ~(uintptr_t)4095, hi = ((ret > at ? ret : at) | 4095) + 1;
  uintptr_t s = (uintptr_t)src;
  if (s >= lo && s < hi && n <= hi - s) {
    memcpy(dst, src, n);
    return 0;
  }
  return copy_in(dst, src, n);
}

/* The id of a process to act on (getpgid, sched_*, prlimit...): 0 is the
 * caller, a negative id is the kernel's to refuse. */
static int proc_arg(pid_t vid, pid_t *sid, int err) {
  if (vid <= 0) {
    *sid = vid;
    return 0;
  }
  return v2s_pid(vid, sid) ? 0 : err;
}

/* The last answer, keyed by the parent's system PID. A parent's PID cannot
 * name another process while we are its child (it is not freed until we
 * are reparented, which changes our parent's PID), so while the kernel
 * reports the same parent the virtual answer stands. Only found parents
 * are remembered: a parent not mapped yet may be mapped a moment later.
 * One 64-bit word, so a signal handler never reads half of an update. */
static uint64_t g_ppid_cache;

/* --- Parent and child agree on the child's virtual PID ------------------
 *
 * Both sides map the child's system PID: the parent when fork() returns,
 * the child in its atfork handler, before fork() returns there. Whichever
 * comes first allocates the entry under the table lock and the other finds
 * it (appshot_map_system reuses an existing mapping), so both end up with
 * the same virtual id and neither waits for the other: a hand-over where the
 * child waits for its parent costs a cross-CPU wake-up on every fork. */

/* In a new process: our own virtual PID. */
static int32_t map_self_now(void) {
  pid_t spid = (pid_t)SYS0(getpid);
  int32_t v = appshot_map_system(g_h, APPSHOT_PID, spid, 0, 0);
  return v >= 0 ? v : spid;
}

/* Set around our fork wrapper's call of the real fork: the child inherits
 * it and so knows its parent is mapping it. */
static __thread int t_in_fork TLS_IE;

/* Registered with pthread_atfork at init, so that it runs right after
 * glibc's own fork work: before the child's other atfork handlers (most of
 * them) and before fork() returns, whoever called it. */
void pid_atfork_child(void) {
  tid_moves_forget();
  if (!g_h) return;
  /* Each page the child writes here is a copy-on-write fault on every
   * fork, so write only what must change. The child's memory is its own,
   * whatever the parent shared (nocache is rarely set). The getppid cache
   * needs no reset: it is keyed by the parent's system PID, which differs
   * in the child. */
  if (__atomic_load_n(&g_nocache, __ATOMIC_RELAXED))
    __atomic_store_n(&g_nocache, 0, __ATOMIC_RELAXED);
  /* A fork's semadj is its own, empty: no other task shares it. */
  if (__atomic_load_n(&g_sem_undo_split, __ATOMIC_RELAXED))
    __atomic_store_n(&g_sem_undo_split, 0, __ATOMIC_RELAXED);
  if (t_in_fork) {
    /* Our wrapper's parent maps us. Asking for the table lock now, at the
     * very moment the parent holds it to do so, would cost a futex sleep
     * and wake-up on most forks: learn our virtual PID when first asked
     * (most children exec or exit before they ask). */
    t_in_fork = 0;
    child_reset_ids(0);
  } else {
    /* glibc's daemon() and forkpty() fork without our wrapper: nobody else
     * will map us. */
    child_reset_ids(map_self_now());
  }
  /* After the ids: a table it marks is claimed as this process's. */
  semop_after_fork_child();
  landlock_fork_child();
}

static pid_t do_fork(void) {
  ensure_init();
  if (!g_h) return REAL(fork)();
  ID_WINDOW();
  /* Signals stay blocked until the child is mapped: a SIGCHLD handler that
   * reaped it first would map and unmap it under one virtual id, and we
   * would then return another. */
  /* A fork child learns its own virtual PID lazily; before it makes
   * children of its own it must be mapped, or their getppid() would find
   * no parent. (A cached read once it is.) */
  self_vpid();
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);
  t_in_fork = 1;
  pid_t pid = REAL(fork)();
  int err = errno;
  t_in_fork = 0;
  pid_t ret = pid;
  if (pid > 0) {
    ret = appshot_map_system(g_h, APPSHOT_PID, pid, 0, 0);
    if (ret < 0) {
      /* Not mappable (table full): a child the application cannot name
       * would be worse than a failed fork. */
      SYS2(kill, pid, SIGKILL);
      SYS4(wait4, pid, NULL, __WALL, NULL);
      appshot_unmap_system(g_h, APPSHOT_PID, pid);
      err = EAGAIN;
    } else {
      landlock_note_child(pid);
    }
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  errno = err;
  return ret;
}

API pid_t fork(void) { return do_fork(); }

/* glibc's own name of it, which a program may call (as some runtimes'
 * fork paths do): the same fork, mapped by the parent. */
API pid_t __fork(void);
API pid_t __fork(void) { return do_fork(); }

/* forkpty() forks inside glibc (its internal __fork, not ours): the child
 * maps itself (pid_atfork_child), but the parent got the child's system
 * PID back, which kill and waitpid then took for a virtual one (review33
 * H1: tmux, script, expect). Made here of the parts glibc makes it of
 * (openpty, fork, login_tty), the fork being ours. */
API int forkpty(int *amaster, char *name, const struct termios *termp, const struct winsize *winp) {
  int master, slave;
  if (openpty(&master, &slave, name, termp, winp) == -1) return -1;
  pid_t pid = do_fork();
  if (pid < 0) {
    int err = errno;
    close(master);
    close(slave);
    errno = err;
    return -1;
  }
  if (pid == 0) {
    close(master);
    if (login_tty(slave)) _exit(1);
    return 0;
  }
  *amaster = master;
  close(slave);
  return pid;
}

/* vfork is fork here. A vfork child borrows the parent's memory until it
 * execs, and our code runs in it (the child's ids are learned, the table
 * lock may be taken): it would overwrite the parent's getpid cache and TLS.
 * A program cannot tell the difference, except that it is a little slower. */
API pid_t vfork(void) { return do_fork(); }

/* --- New PID, network and IPC namespaces --------------------------------- *
 *
 * A process in a PID namespace of its own sees ids the tables do not hold
 * (it is PID 1 there; its getpid() would be mapped as the system's PID 1),
 * and one in a network or IPC namespace of its own has sockets and SysV
 * objects where a snapshot does not look; none of them a restore could
 * make again (a snapshot refuses such a process by name: process.ts). So
 * such a namespace is refused with EPERM, as a container without
 * CAP_SYS_ADMIN refuses it, and programs written for containers go on
 * without: vsftpd's isolate=YES (the default) clones each session with
 * CLONE_NEWPID|CLONE_NEWIPC, and its unprivileged half with CLONE_NEWNET,
 * through syscall(), and forks instead on EPERM; before, its listener
 * looked an ended session up under a PID it never stored and crashed.
 * Mount, UTS, user, cgroup and time namespaces are the program's to make. */
#define REFUSED_NS (CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC)

long ns_refused(unsigned long flags) {
  if (!g_h || !(flags & REFUSED_NS)) return 0;
  errno = EPERM;
  return -1;
}

API int unshare(int flags) {
  ensure_init();
  if (ns_refused((unsigned long)flags)) return -1;
  return (int)libc_ret(SYS1(unshare, flags));
}

/* setns(fd, nstype) is the same escape into a namespace that exists
 * already (another process's, by /proc/PID/ns/net or its pidfd; one bound
 * to a file: ip netns). Refused alike, with one exception: the namespace
 * of the application itself, its init's (what a snapshot compares each
 * thread's with: process.ts), which a program that left it by a raw
 * system call goes back to (holder.c's netlink-netns; Go's netns idiom
 * saves its own and returns). The descriptor's own kind decides for a
 * namespace descriptor (with nstype 0 or its own kind: another kind is
 * the kernel's EINVAL); for a pidfd (anything else: EINVAL again) the
 * kinds asked for, as there is no one namespace to compare. */
#define NSFS_MAGIC 0x6e736673 /* statfs's f_type of a namespace descriptor */

/* Whether namespace descriptor `fd`, of kind `type`, is the application's
 * init's namespace of that kind: the same nsfs inode as
 * /proc/<init>/ns/<name> (PID: the namespace its children go to, as the
 * snapshot compares them). Not found (init gone, its links closed to us):
 * no. A translation window: the init's system PID goes into a path. */
static int ns_is_home(int fd, long type) {
  ID_WINDOW();
  pid_t init;
  if (!v2s_pid(VINIT, &init)) return 0;
  const char *name = type == CLONE_NEWNET ? "net" : type == CLONE_NEWIPC ? "ipc" : "pid_for_children";
  char path[64] = "/proc/";
  char *p = put_decimal(path + 6, (unsigned long)init);
  memcpy(p, "/ns/", 4);
  p += 4;
  size_t n = strlen(name);
  memcpy(p, name, n + 1);
  struct stat ours, home;
  return SYS2(fstat, fd, &ours) == 0 && SYS4(newfstatat, AT_FDCWD, path, &home, 0) == 0 &&
         ours.st_dev == home.st_dev && ours.st_ino == home.st_ino;
}

long do_setns(int fd, int nstype) {
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) == 0 && sf.f_type == NSFS_MAGIC) {
    /* Exact and cheap (Linux 4.11): the descriptor's kind. Before it,
     * the kinds asked for (nstype 0 then passes: the kernel's to say). */
    long type = SYS2(ioctl, fd, NS_GET_NSTYPE);
    if (type <= 0) type = nstype & REFUSED_NS;
    if ((type & REFUSED_NS) && (nstype == 0 || nstype == type) && !ns_is_home(fd, type))
      return fail(EPERM);
  } else if (ns_refused((unsigned long)(unsigned int)nstype)) {
    return -1;
  }
  return libc_ret(SYS2(setns, fd, nstype));
}

API int setns(int fd, int nstype) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(setns, fd, nstype));
  return (int)do_setns(fd, nstype);
}

/* A clone about to share our memory with a process (the reaped ring's,
 * below). */
static void reaped_shared_by(unsigned long flags);

/* How a fork of fork_made_by's (below) is made: -errno on failure. */
typedef long (*forker)(long nr, long a, long b);

static long fork_by_syscall(long nr, long a, long b) { return appshot_raw_syscall(nr, a, b, 0, 0, 0, 0); }

static pid_t fork_made_by(forker make, long nr, long a, long b, uint64_t ptid);

/* `id` written at `where` as the kernel writes a clone's parent_tid: a
 * bad address, which the kernel let pass, is no fault here either. */
static void put_id_as_kernel(pid_t *where, pid_t id) {
  struct iovec here = {&id, sizeof id}, there = {where, sizeof id};
  SYS6(process_vm_writev, SYS0(getpid), &here, 1, &there, 1, 0);
}

/* `id` over the system id `system` the kernel wrote at a clone's
 * parent_tid, in memory the child shares (CLONE_VM), only while that word
 * still holds it: the child may have run, exited and had the kernel
 * clear that very word before we get here (CLONE_CHILD_CLEARTID at the
 * same word, as glibc before 2.34 made its threads), and a join waits for
 * that 0, which must stay the last word written (review35a). Read first
 * without a fault (a bad address, which the kernel let pass, holds no
 * id), then swapped atomically against the child's exit. */
static void replace_id_as_kernel(pid_t *where, pid_t system, pid_t id) {
  pid_t now = 0;
  struct iovec here = {&now, sizeof now}, there = {where, sizeof now};
  if (SYS6(process_vm_readv, SYS0(getpid), &here, 1, &there, 1, 0) != (long)sizeof now || now != system) return;
  __atomic_compare_exchange_n(where, &system, id, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static pid_t do_raw_fork(long nr, long a, long b, uint64_t ptid) { return fork_made_by(fork_by_syscall, nr, a, b, ptid); }

/* syscall(SYS_fork) and syscall(SYS_vfork), which no glibc code sees: a
 * fork (vfork as fork, as vfork() is here). */
long do_fork_syscall(void) { return do_raw_fork(SYS_fork, 0, 0, 0); }

/* _Fork (glibc 2.34): a fork that runs no atfork handler, so neither
 * side knew of it (the parent got the system PID, the child kept its
 * parent's cached ids). glibc's own, which keeps its thread state right
 * in the child (its TID, the robust list), inside the same mapping as a
 * raw fork's. Async-signal-safe as glibc's is: the table lock blocks
 * every signal while it is held. */
static long fork_by_libc(long nr, long a, long b) {
  (void)nr, (void)a, (void)b;
  pid_t pid = ((pid_t(*)(void))real__Fork)();
  return pid < 0 ? -errno : pid;
}

API pid_t _Fork(void);
API pid_t _Fork(void) {
  ensure_init();
  if (!real__Fork) {
    errno = ENOSYS;
    return -1;
  }
  if (!g_h) return ((pid_t(*)(void))real__Fork)();
  return fork_made_by(fork_by_libc, 0, 0, 0, 0);
}

/* A fork made by the clone system call itself (syscall(SYS_clone, flags,
 * 0): no stack, no shared memory, as vsftpd makes each session's
 * unprivileged half with CLONE_NEWNET | SIGCHLD), or by clone3 (`nr`, its
 * arguments a and b): glibc's fork handling, and so our atfork handler,
 * does not run, so the child's ids are reset here; the parent maps the
 * child as do_fork does. Before, the child kept its parent's cached
 * virtual PID (vsftpd then saw getpid() != getpgrp() after setsid and died
 * "not session leader"). `ptid`: where the kernel stored the child's
 * system PID in the parent (clone3's CLONE_PARENT_SETTID), 0 for none.
 * `make` makes the fork: the system call `nr` with a and b (do_raw_fork),
 * or glibc's _Fork. */
static pid_t fork_made_by(forker make, long nr, long a, long b, uint64_t ptid) {
  ID_WINDOW();
  self_vpid();
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);
  long pid = make(nr, a, b);
  if (pid == 0) {
    tid_moves_forget();
    __atomic_store_n(&g_nocache, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_sem_undo_split, 0, __ATOMIC_RELAXED);
    child_reset_ids(map_self_now());
    semop_after_fork_child();
    landlock_fork_child();
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return 0;
  }
  int err = pid < 0 ? (int)-pid : 0;
  pid_t ret = pid < 0 ? -1 : (pid_t)pid;
  if (pid > 0) {
    ret = appshot_map_system(g_h, APPSHOT_PID, (pid_t)pid, 0, 0);
    if (ret < 0) {
      SYS2(kill, pid, SIGKILL);
      SYS4(wait4, pid, NULL, __WALL, NULL);
      appshot_unmap_system(g_h, APPSHOT_PID, (pid_t)pid);
      err = EAGAIN;
      ret = -1;
    } else {
      landlock_note_child((int32_t)pid);
      /* The virtual PID where the kernel put the system one (as clone()
       * does below). */
      if (ptid) put_id_as_kernel((pid_t *)(uintptr_t)ptid, ret);
    }
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  if (err) errno = err;
  return ret;
}

/* Flags that make a clone something else than a fork: shared memory or
 * files, a thread, ids written or descriptors handed back, another parent. */
#define NOT_A_FORK                                                       \
  (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |    \
   CLONE_VFORK | CLONE_SETTLS | CLONE_PARENT_SETTID | CLONE_CHILD_SETTID | \
   CLONE_CHILD_CLEARTID | CLONE_PIDFD | CLONE_PARENT | CLONE_PTRACE)

/* A raw clone with CLONE_CHILD_SETTID in memory the child shares: the
 * child, before it leaves our code, waits for the virtual id its parent
 * maps and writes it over the system id the kernel left at child_tid
 * (as thread_child does for the clone() wrapper). It lies just below the
 * child's stack, which nothing else uses before the child runs, and holds
 * everything the child's few instructions need ready made: the child
 * runs no C (it may be on a thread pointer of its own, or none), uses no
 * stack, and writes child_tid by process_vm_writev (a bad address, which
 * the kernel let pass, is no fault here either). The offsets are the
 * assembly's below.
 *
 * The child sleeps on vtid (a futex the parent wakes once it published),
 * not spinning: a parent merely descheduled costs it no core. It wakes
 * every RAW_CLONE_WAIT_NS to ask whether the parent still lives, as a
 * process that is not a thread outlives a parent killed in that instant
 * (SIGKILL, which the parent's blocked signals do not hold back), which
 * then never publishes: the parent is gone once the child's getppid()
 * no longer answers `ppid` (the parent's exit reparents the child at
 * once, before anyone reaps the parent; 0 when the child's parent is
 * not the caller: CLONE_PARENT or a thread) or tgkill(`pid`, `tid`, 0)
 * finds no caller thread (ESRCH; a zombie leader is found until reaped).
 * The child then keeps the kernel's id at child_tid and learns its
 * virtual one when it asks (getpid maps it if the parent did not). A
 * snapshot lets the parent out of its window first, so vtid is published
 * in any image: a child restored between its look at vtid and at its
 * parent, which then finds the old node's ids gone, looks at vtid again
 * before it gives up. (A parent whose other thread execs in that instant
 * lives on as the new program, and its child waits for good, as before.)
 *
 * Without CLONE_VM the same slot, with vtid -1, is a local of the
 * caller's, which the child finds at the same address in its copy of the
 * memory: it only gives the child back the caller's signal mask (all
 * signals are blocked across the call, see clone_on_stack). */
#define RAW_CLONE_WAIT_NS 20000000L
struct raw_clone_slot {
  struct iovec here;     /* 0: vtid, 4 bytes */
  struct iovec there;    /* 16: the caller's child_tid word */
  uint64_t mask;         /* 32: the child's signal mask, the caller's */
  int32_t vtid;          /* 40: 0 until published, -1 for none */
  int32_t tid;           /* 44: the calling thread's system TID */
  struct timespec wait;  /* 48: how long the child sleeps between looks */
  int32_t ppid;          /* 64: the child's getppid() while the parent lives, or 0 */
  int32_t pid;           /* 68: the caller's system PID */
  uint64_t pad;
};
_Static_assert(offsetof(struct raw_clone_slot, here) == 0 && offsetof(struct raw_clone_slot, there) == 16 &&
                   offsetof(struct raw_clone_slot, mask) == 32 && offsetof(struct raw_clone_slot, vtid) == 40 &&
                   offsetof(struct raw_clone_slot, tid) == 44 && offsetof(struct raw_clone_slot, wait) == 48 &&
                   offsetof(struct raw_clone_slot, ppid) == 64 && offsetof(struct raw_clone_slot, pid) == 68 &&
                   sizeof(struct raw_clone_slot) == 80,
               "raw_clone_on_stack reads the slot at these offsets");

/* The clone system call (flags, stack, parent_tid, child_tid, tls),
 * returning in the child exactly as glibc's syscall() does: a bare `ret`
 * on the stack the child was given, which pops the address the caller
 * put at its top (a program that clones by syscall() with a stack can
 * only work so). Compiled C after the system call would instead pop its
 * saved registers and return address off that stack. With `slot`, the
 * child first waits there for its virtual id (vtid 0), writes it at
 * child_tid (vtid > 0) and lets its signals in. -errno on failure, in
 * the parent. */
#define ASM_NUMBER_(x) #x
#define ASM_NUMBER(x) ASM_NUMBER_(x) /* a macro's number, in assembly text */
HIDDEN long raw_clone_on_stack(long flags, long stack, long ptid, long ctid, long tls, struct raw_clone_slot *slot);
/* The same for clone3 (its arguments and their size). */
HIDDEN long raw_clone3_on_stack(long args, long size, struct raw_clone_slot *slot);
__asm__(".text\n"
        ".globl raw_clone3_on_stack\n"
        ".hidden raw_clone3_on_stack\n"
        ".type raw_clone3_on_stack, @function\n"
        "raw_clone3_on_stack:\n"
        ".cfi_startproc\n"
        "  mov %rdx, %r9\n"
        "  mov $" ASM_NUMBER(SYS_clone3) ", %eax\n"
        "  jmp 0f\n"
        ".cfi_endproc\n"
        ".size raw_clone3_on_stack, .-raw_clone3_on_stack\n"
        ".globl raw_clone_on_stack\n"
        ".hidden raw_clone_on_stack\n"
        ".type raw_clone_on_stack, @function\n"
        "raw_clone_on_stack:\n"
        ".cfi_startproc\n"
        "  mov %rcx, %r10\n"
        "  mov $" ASM_NUMBER(SYS_clone) ", %eax\n"
        "0:syscall\n"
        "  test %rax, %rax\n"
        "  jz 1f\n"
        "  ret\n"                 /* the parent, or an error */
        "1:test %r9, %r9\n"       /* the child: registers as the parent's */
        "  jz 4f\n"
        "  mov %r9, %rbx\n"       /* syscall keeps rbx; the child's entry saves none */
        "2:mov 40(%rbx), %eax\n"
        "  test %eax, %eax\n"
        "  jnz 3f\n"
        "  mov 64(%rbx), %eax\n"  /* is the parent still there? */
        "  test %eax, %eax\n"
        "  jz 6f\n"
        "  mov $" ASM_NUMBER(SYS_getppid) ", %eax\n"
        "  syscall\n"
        "  cmp 64(%rbx), %eax\n"
        "  jne 7f\n"              /* reparented: the parent exited */
        "6:movslq 68(%rbx), %rdi\n"
        "  movslq 44(%rbx), %rsi\n"
        "  xor %edx, %edx\n"
        "  mov $" ASM_NUMBER(SYS_tgkill) ", %eax\n"
        "  syscall\n"
        "  cmp $-" ASM_NUMBER(ESRCH) ", %rax\n"
        "  je 7f\n"               /* the calling thread is gone */
        "  lea 40(%rbx), %rdi\n"  /* sleep while vtid is 0, for a while */
        "  mov $" ASM_NUMBER(FUTEX_WAIT_PRIVATE) ", %esi\n"
        "  xor %edx, %edx\n"
        "  lea 48(%rbx), %r10\n"
        "  xor %r8d, %r8d\n"
        "  xor %r9d, %r9d\n"
        "  mov $" ASM_NUMBER(SYS_futex) ", %eax\n"
        "  syscall\n"
        "  jmp 2b\n"
        "7:mov 40(%rbx), %eax\n"  /* gone, unless published meanwhile */
        "  test %eax, %eax\n"
        "  jz 5f\n"
        "3:jl 5f\n"               /* -1: no virtual id, the kernel's stays */
        "  mov $" ASM_NUMBER(SYS_getpid) ", %eax\n"
        "  syscall\n"
        "  mov %rax, %rdi\n"
        "  mov %rbx, %rsi\n"
        "  mov $1, %edx\n"
        "  lea 16(%rbx), %r10\n"
        "  mov $1, %r8d\n"
        "  xor %r9d, %r9d\n"
        "  mov $" ASM_NUMBER(SYS_process_vm_writev) ", %eax\n"
        "  syscall\n"
        "5:mov $" ASM_NUMBER(SYS_rt_sigprocmask) ", %eax\n"
        "  mov $" ASM_NUMBER(SIG_SETMASK) ", %edi\n"
        "  lea 32(%rbx), %rsi\n"
        "  xor %edx, %edx\n"
        "  mov $8, %r10d\n"
        "  syscall\n"
        "4:ret\n"                 /* into the caller's entry, on its stack */
        ".cfi_endproc\n"
        ".size raw_clone_on_stack, .-raw_clone_on_stack\n");

/* syscall(SYS_clone) or syscall(SYS_clone3) with a stack: a thread, or a
 * process sharing our memory or not, that returns in the child on that
 * stack. Before, it went to the kernel as given and the caller got the
 * system TID (and found it at parent_tid and child_tid), where glibc's
 * clone() wrapper gives the virtual one; and the child, returning through
 * our compiled frame on its new stack, did not return where glibc's
 * syscall() would. Mapped here as the clone() wrapper maps its children
 * (a thread as the caller's, anything else as a child process), the
 * caches and window marks shared as there. A child with CLONE_VFORK is
 * not waited for at child_tid: the caller stays in the call until it
 * execs or exits. A child without CLONE_VM finds the id caches empty.
 *
 * `ca`: clone3's arguments (our copy, `size` bytes), else clone's are
 * flags to tls. clone3 has a field of its own for the pidfd, clone hands
 * it back at parent_tid; the child's stack pointer starts at the top of
 * clone3's stack, at clone's `stack`. */
static long clone_on_stack(long flags, long stack, long ptid, long ctid, long tls, const struct clone_args *ca, long size) {
  if (ca) {
    flags = (long)ca->flags;
    stack = (long)(ca->stack + ca->stack_size);
    ptid = (long)ca->parent_tid;
    ctid = (long)ca->child_tid;
  }
  int ptid_is_tid = (flags & CLONE_PARENT_SETTID) && (ca || !(flags & CLONE_PIDFD)) && ptid;
  ID_WINDOW();
  pid_t parent = self_spid();
  self_vpid(); /* mapped before our children look for us (see do_fork) */
  if (flags & CLONE_VM) __atomic_store_n(&g_nocache, 1, __ATOMIC_RELAXED);
  note_sem_undo_split((unsigned long)flags);
  if ((flags & CLONE_VM) && !(flags & CLONE_SETTLS)) __atomic_store_n(&g_tls_shared, 1, __ATOMIC_SEQ_CST);
  reaped_shared_by((unsigned long)flags);
  struct raw_clone_slot *slot = NULL; /* what the stub's child reads, or NULL */
  int below_stack = 0;                 /* slot is the one below the child's stack */
  struct raw_clone_slot before;        /* what that slot's bytes were */
  struct raw_clone_slot own;           /* the slot of a child of its own memory */
  sigset_t all, saved;
  int blocked = 0;
  sigfillset(&all);
  uintptr_t at = ((uintptr_t)stack - sizeof before) & ~(uintptr_t)15;
  /* The slot is the caller's memory below the child's stack pointer: only
   * inside clone3's stack when it says where that is (review 243 L1), and
   * never where the kernel writes the child's id (L2). */
  int room = !ca || (ca->stack_size >= sizeof before + 16);
  /* Every word the kernel writes in the parent's memory: the child's id
   * at child_tid and at parent_tid, and the pidfd, which clone writes at
   * parent_tid (CLONE_PIDFD) and clone3 at its own field (review r250
   * L7: written over the slot's saved mask, the child started with the
   * fd's number as its signal mask). Each an int. */
  uintptr_t written[3] = {
      (uintptr_t)ctid,
      (flags & (CLONE_PARENT_SETTID | (ca ? 0 : CLONE_PIDFD))) ? (uintptr_t)ptid : 0,
      ca && (flags & CLONE_PIDFD) ? (uintptr_t)ca->pidfd : 0,
  };
  int overlaps = 0;
  for (int i = 0; i < 3; i++)
    if (written[i] && written[i] + sizeof(int) > at && written[i] < at + sizeof before) overlaps = 1;
  if ((flags & CLONE_VM) && (flags & CLONE_CHILD_SETTID) && ctid && !(flags & CLONE_VFORK) && room && !overlaps) {
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    blocked = 1;
    struct raw_clone_slot s;
    memset(&s, 0, sizeof s);
    slot = (struct raw_clone_slot *)at;
    s.here = (struct iovec){&slot->vtid, sizeof slot->vtid};
    s.there = (struct iovec){(void *)ctid, sizeof(pid_t)};
    memcpy(&s.mask, &saved, sizeof s.mask);
    s.tid = (pid_t)SYS0(gettid);
    s.pid = parent;
    /* A thread's getppid() is its process's parent's, as is a child's of
     * CLONE_PARENT: not ours, so it tells nothing of us. */
    s.ppid = (flags & (CLONE_THREAD | CLONE_PARENT)) ? 0 : parent;
    s.wait.tv_nsec = RAW_CLONE_WAIT_NS;
    /* Read, then written, as the kernel would: a stack the kernel is left
     * to fault on is no fault of ours; the child then keeps the kernel's
     * id. What was there is put back if the kernel refuses the clone
     * (review 243 M1: the caller's data below the stack). */
    struct iovec old = {&before, sizeof before}, here = {&s, sizeof s}, there = {slot, sizeof s};
    if (SYS6(process_vm_readv, parent, &old, 1, &there, 1, 0) != (long)sizeof s ||
        SYS6(process_vm_writev, parent, &here, 1, &there, 1, 0) != (long)sizeof s) {
      slot = NULL;
      pthread_sigmask(SIG_SETMASK, &saved, NULL);
      blocked = 0;
    } else {
      below_stack = 1;
    }
  }
  /* A child of its own memory runs none of our code (the stub returns in
   * it on its stack): it finds the caches empty and learns its ids when
   * first asked, not its parent's (review 243 M3). Put back in the
   * parent. Every signal is blocked from before they are emptied until
   * they are back: a handler of this thread that asked for our ids in
   * between would cache them again, and the child's copy would keep
   * them. The child inherits that mask, and the stub gives it the
   * caller's back from `own`, which it finds in its copy of our memory
   * (vtid -1: nothing to wait for); the signals that came meanwhile are
   * the parent's, as a fork child starts with none pending. Another
   * thread that asks meanwhile maps the same ids. */
  int32_t cached_vpid = 0, cached_vtid = 0;
  if (!(flags & CLONE_VM)) {
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    blocked = 1;
    memset(&own, 0, sizeof own);
    memcpy(&own.mask, &saved, sizeof own.mask);
    own.vtid = -1;
    slot = &own;
    cached_vpid = __atomic_exchange_n(&g_vpid, 0, __ATOMIC_SEQ_CST);
    cached_vtid = t_vtid;
    t_vtid = 0;
    test_pause("clone-caches-emptied");
  }
  long id = ca ? raw_clone3_on_stack((long)ca, size, slot) : raw_clone_on_stack(flags, stack, ptid, ctid, tls, slot);
  long ret = id;
  if (!(flags & CLONE_VM)) {
    if (cached_vpid) __atomic_store_n(&g_vpid, cached_vpid, __ATOMIC_SEQ_CST);
    if (cached_vtid) t_vtid = cached_vtid;
  }
  if (id < 0 && below_stack) {
    struct iovec back = {&before, sizeof before}, there = {slot, sizeof before};
    SYS6(process_vm_writev, parent, &back, 1, &there, 1, 0);
  }
  if (id > 0) {
    int32_t v;
    if (flags & CLONE_THREAD) {
      v = appshot_map_system(g_h, APPSHOT_PID, (pid_t)id, APPSHOT_F_THREAD, parent);
      if (v >= 0) appshot_set_flags(g_h, APPSHOT_PID, parent, APPSHOT_F_THREADS);
    } else {
      v = appshot_map_system(g_h, APPSHOT_PID, (pid_t)id, 0, 0);
      if (v >= 0) landlock_note_child((int32_t)id);
    }
    if (v >= 0) {
      if (ptid_is_tid) replace_id_as_kernel((pid_t *)ptid, (pid_t)id, v);
      ret = v;
    }
    if (below_stack) {
      test_pause("clone-publishing");
      /* The child may run on and reuse its stack from here on: the wake
       * may then land on a word of its own, which any futex user takes
       * as the spurious wake-up futexes allow. */
      __atomic_store_n(&slot->vtid, v > 0 ? v : -1, __ATOMIC_RELEASE);
      SYS3(futex, &slot->vtid, FUTEX_WAKE_PRIVATE, 1);
    }
  }
  if (blocked) pthread_sigmask(SIG_SETMASK, &saved, NULL);
  return libc_ret(ret);
}

/* clone as a system call (syscall(SYS_clone, ...)): no stack and none of
 * NOT_A_FORK is a fork (into new namespaces, maybe), which the child's and
 * parent's tables must agree on; with a stack, clone_on_stack; other uses
 * (CLONE_VM without a stack: the child on the caller's) go to the kernel
 * as given. */
long do_clone_syscall(long flags, long stack, long ptid, long ctid, long tls) {
  if (ns_refused((unsigned long)flags)) return -1;
  if (stack == 0 && !(flags & NOT_A_FORK)) return do_raw_fork(SYS_clone, flags, 0, 0);
  if (stack != 0) return clone_on_stack(flags, stack, ptid, ctid, tls, NULL, 0);
  reaped_shared_by((unsigned long)flags);
  return libc_ret(appshot_raw_syscall(SYS_clone, flags, stack, ptid, ctid, tls, 0));
}

/* clone3 as a system call (syscall(SYS_clone3, &args, size): runtimes and
 * programs that fork with it themselves; glibc's own uses, pthread_create
 * and posix_spawn, are its inline system calls, which never come here).
 *
 * A new process whose child side returns here, on the stack it called
 * from (no stack given: with one, the child would return into this
 * function on a stack it has no frame on, with or without us), and on our
 * thread pointer (no CLONE_SETTLS) is a fork, made known to the tables as
 * the SYS_clone one is. Unlike clone's, its other flags may stay:
 * clone3 has a field of its own for each thing they hand back (pidfd,
 * parent_tid, child_tid), so none is read as another. With a stack (a
 * thread, or a process sharing our memory or not): clone_on_stack, as
 * SYS_clone's. Left to the kernel as given, the child returning as from
 * glibc's syscall(): threads (CLONE_THREAD; CLONE_SIGHAND goes with
 * CLONE_VM) and another thread pointer without a stack, and shared
 * memory without CLONE_VFORK (two processes on one stack from here on).
 *
 * CLONE_VM | CLONE_VFORK without a stack is a vfork (the parent waits
 * until the child execs or exits), which our vfork() makes a fork (our
 * code running in the child would write the parent's caches and TLS): so
 * here, CLONE_VM is dropped and CLONE_VFORK kept (the parent still waits).
 *
 * The arguments are read as the kernel would, not dereferenced (a bad
 * pointer is the kernel's EFAULT to give), into our own copy, which is
 * what the kernel is handed: read once, another thread cannot change
 * them between our look and the kernel's. A size larger than the copy
 * (fields after cgroup, of a kernel newer than our headers) goes to the
 * kernel as given, looked at for its namespaces only. */
#define CLONE3_NOT_A_FORK (CLONE_THREAD | CLONE_SIGHAND | CLONE_SETTLS)

long do_clone3_syscall(long args, long size) {
  struct clone_args ca;
  memset(&ca, 0, sizeof ca);
  /* CLONE_ARGS_SIZE_VER0: anything shorter is the kernel's EINVAL. */
  if (!args || size < 64) return libc_ret(appshot_raw_syscall(SYS_clone3, args, size, 0, 0, 0, 0));
  size_t n = (unsigned long)size < sizeof ca ? (size_t)size : sizeof ca;
  if (copy_in(&ca, (const void *)args, n) != 0)
    return libc_ret(appshot_raw_syscall(SYS_clone3, args, size, 0, 0, 0, 0));
  if (ns_refused(ca.flags)) return -1;
  if ((unsigned long)size <= sizeof ca && ca.stack) return clone_on_stack(0, 0, 0, 0, 0, &ca, (long)n);
  if ((unsigned long)size > sizeof ca || ca.stack || (ca.flags & CLONE3_NOT_A_FORK) ||
      (ca.flags & (CLONE_VM | CLONE_VFORK)) == CLONE_VM) {
    /* The child returns as from glibc's syscall(), on whatever stack. */
    reaped_shared_by((unsigned long)ca.flags);
    return libc_ret(raw_clone3_on_stack(args, size, NULL));
  }
  ca.flags &= ~(uint64_t)CLONE_VM;
  return do_raw_fork(SYS_clone3, (long)&ca, (long)n,
                     (ca.flags & CLONE_PARENT_SETTID) ? ca.parent_tid : 0);
}

/* --- clone ---------------------------------------------------------------- */

/* Lives at the top of the child's stack, so the child can read it with or
 * without CLONE_VM. */
struct clone_tramp {
  int (*fn)(void *);
  void *arg;
  sigset_t mask;
  int flags;
  pid_t *ctid; /* CLONE_CHILD_SETTID's word, or NULL */
  /* A thread's (CLONE_THREAD): its virtual TID, published by the parent
   * once mapped; 0 until then, -1 for none (a full table). */
  int32_t vtid;
};

/* CLONE_CHILD_SETTID: the kernel writes the new task's system id at ctid
 * in the child, as it first runs, before any of the child's code: the
 * child's first code (ours) writes the virtual one over it. */
static int clone_child(void *p) {
  struct clone_tramp *t = p;
  int32_t v = map_self_now();
  landlock_fork_child();
  /* With CLONE_VM our globals are the parent's (and g_nocache is set). */
  if (!(t->flags & CLONE_VM)) {
    __atomic_store_n(&g_nocache, 0, __ATOMIC_RELAXED);
    if (!(t->flags & CLONE_SYSVSEM)) __atomic_store_n(&g_sem_undo_split, 0, __ATOMIC_RELAXED);
    child_reset_ids(v);
  }
  if (t->ctid && v > 0) put_id_as_kernel(t->ctid, v);
  pthread_sigmask(SIG_SETMASK, &t->mask, NULL);
  return t->fn(t->arg);
}

/* A raw thread with CLONE_CHILD_SETTID starts here: it may run on a
 * thread pointer of its own (CLONE_SETTLS), where none of our thread
 * state is, so it touches none (raw calls only) and maps nothing itself:
 * it waits for the virtual TID its parent maps (the parent, every signal
 * blocked, publishes it before it returns; a snapshot lets it run out of
 * its window first), writes it at ctid, and lets its signals in. */
static int thread_child(void *p) {
  struct clone_tramp *t = p;
  int32_t v;
  /* Asleep, not spinning: a parent merely descheduled costs us no core.
   * It wakes us once it published. No look for a parent killed meanwhile
   * (raw_clone_slot's): we are its thread, and die with it. */
  while (!(v = __atomic_load_n(&t->vtid, __ATOMIC_ACQUIRE))) SYS4(futex, &t->vtid, FUTEX_WAIT_PRIVATE, 0, NULL);
  if (v > 0) put_id_as_kernel(t->ctid, v);
  int (*fn)(void *) = t->fn;
  void *arg = t->arg;
  SYS4(rt_sigprocmask, SIG_SETMASK, &t->mask, NULL, _NSIG / 8);
  return fn(arg);
}

/* clone of a raw thread with CLONE_CHILD_SETTID (the caller's window
 * open): the thread starts in thread_child, on the top of its stack, and
 * is given its virtual TID there, once mapped here, every signal blocked
 * meanwhile (a handler that left by siglongjmp would leave the thread
 * waiting for good). */
static NOINLINE int clone_thread_child_settid(int (*fn)(void *), void *stack, int flags, void *arg,
                                              pid_t *ptid, void *tls, pid_t *ctid, pid_t parent) {
  struct clone_tramp *t =
      (struct clone_tramp *)(((uintptr_t)stack - sizeof *t) & ~(uintptr_t)15);
  t->fn = fn;
  t->arg = arg;
  t->flags = flags;
  t->ctid = ctid;
  t->vtid = 0;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &t->mask);
  sigset_t saved = t->mask;
  pid_t tid = REAL(clone)(thread_child, t, flags, t, ptid, tls, ctid);
  int err = errno;
  pid_t ret = tid;
  if (tid > 0) {
    int32_t v = appshot_map_system(g_h, APPSHOT_PID, tid, APPSHOT_F_THREAD, parent);
    if (v >= 0) {
      appshot_set_flags(g_h, APPSHOT_PID, parent, APPSHOT_F_THREADS);
      if ((flags & CLONE_PARENT_SETTID) && !(flags & CLONE_PIDFD) && ptid) replace_id_as_kernel(ptid, tid, v);
      ret = v;
    }
    /* The thread may run on and reuse its stack from here on (the wake
     * then a spurious one, which any futex user allows). */
    __atomic_store_n(&t->vtid, v > 0 ? v : -1, __ATOMIC_RELEASE);
    SYS3(futex, &t->vtid, FUTEX_WAKE_PRIVATE, 1);
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  errno = err;
  return ret;
}

API int clone(int (*fn)(void *), void *stack, int flags, void *arg, ...) {
  va_list ap;
  va_start(ap, arg);
  pid_t *ptid = va_arg(ap, pid_t *);
  void *tls = va_arg(ap, void *);
  pid_t *ctid = va_arg(ap, pid_t *);
  va_end(ap);
  ensure_init();
  if (ns_refused((unsigned long)flags)) return -1;
  if (!g_h || !fn || !stack)
    return REAL(clone)(fn, stack, flags, arg, ptid, tls, ctid);
  ID_WINDOW();

  pid_t parent = self_spid();
  self_vpid(); /* mapped before our children look for us (see do_fork) */
  if (flags & CLONE_VM)
    __atomic_store_n(&g_nocache, 1, __ATOMIC_RELAXED);
  note_sem_undo_split((unsigned long)flags);
  reaped_shared_by((unsigned long)flags);
  /* The child will share our thread pointer, and so our window marks,
   * from its first instruction on (preload.h, g_tls_shared). */
  if ((flags & CLONE_VM) && !(flags & CLONE_SETTLS))
    __atomic_store_n(&g_tls_shared, 1, __ATOMIC_SEQ_CST);
  /* Not with CLONE_VFORK: the caller stays in clone until the thread
   * exits, so the thread would wait for good for the TID it would publish
   * on its return (review35a); such a thread keeps the kernel's word. */
  if ((flags & CLONE_THREAD) && (flags & CLONE_CHILD_SETTID) && ctid && !(flags & CLONE_VFORK))
    return clone_thread_child_settid(fn, stack, flags, arg, ptid, tls, ctid, parent);
  if (flags & CLONE_THREAD) {
    /* A raw thread: its TLS is not ours to cache in, and both sides may map
     * its TID, hence nocache (set above: CLONE_THREAD implies CLONE_VM). */
    pid_t tid = REAL(clone)(fn, stack, flags, arg, ptid, tls, ctid);
    if (tid <= 0) return tid;
    int32_t v = appshot_map_system(g_h, APPSHOT_PID, tid, APPSHOT_F_THREAD,
                                   parent);
    if (v < 0) return tid;
    appshot_set_flags(g_h, APPSHOT_PID, parent, APPSHOT_F_THREADS);
    /* The kernel wrote the system TID at parent_tid before it returned:
     * the caller gets the virtual one there, as clone() returns it (inside
     * the window: a snapshot never sees the system TID left there). The
     * thread may read that word before this store, and see the system
     * TID: a runtime that reads it in the thread waits for the parent's
     * answer, which holds the virtual one. (CLONE_CHILD_SETTID's word,
     * which the kernel writes as the thread first runs, after any store
     * of ours here: clone_thread_child_settid.) */
    if ((flags & CLONE_PARENT_SETTID) && !(flags & CLONE_PIDFD) && ptid)
      replace_id_as_kernel(ptid, tid, v);
    return v;
  }

  struct clone_tramp *t =
      (struct clone_tramp *)(((uintptr_t)stack - sizeof *t) & ~(uintptr_t)15);
  t->fn = fn;
  t->arg = arg;
  t->flags = flags;
  t->ctid = (flags & CLONE_CHILD_SETTID) ? ctid : NULL;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &t->mask);
  sigset_t saved = t->mask; /* the child may reuse its stack top */
  pid_t pid = REAL(clone)(clone_child, t, flags, t, ptid, tls, ctid);
  int err = errno;
  pid_t ret = pid;
  if (pid > 0) {
    ret = adopt(pid);
    landlock_note_child(pid);
    if ((flags & CLONE_PARENT_SETTID) && !(flags & CLONE_PIDFD) && ptid)
      replace_id_as_kernel(ptid, pid, ret);
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  errno = err;
  return ret;
}

/* --- Own ids -------------------------------------------------------------- */

API pid_t getpid(void) {
  ensure_init();
  if (UNLIKELY(!g_h)) return (pid_t)SYS0(getpid);
  return self_vpid();
}

API pid_t gettid(void) {
  ensure_init();
  if (UNLIKELY(!g_h)) return (pid_t)SYS0(gettid);
  return self_vtid();
}


long do_getppid(void) {
  ID_WINDOW();
  int32_t sppid = (int32_t)SYS0(getppid);
  test_pause("getppid-answered");
  uint64_t c = __atomic_load_n(&g_ppid_cache, __ATOMIC_RELAXED);
  if (LIKELY(c && (int32_t)(uint32_t)c == sppid)) return (int32_t)(c >> 32);
  int32_t v;
  if (!appshot_s2v(g_h, APPSHOT_PID, sppid, &v)) return 0;
  __atomic_store_n(&g_ppid_cache, ((uint64_t)(uint32_t)v << 32) | (uint32_t)sppid,
                   __ATOMIC_RELAXED);
  return v;
}

API pid_t getppid(void) {
  ensure_init();
  if (!g_h) return (pid_t)SYS0(getppid);
  return (pid_t)do_getppid();
}

/* --- Recently reaped children ---------------------------------------------
 *
 * A child's SIGCHLD may be taken after a wait reaped it (the signal
 * blocked meanwhile, a signalfd read after waitpid, a handler that runs
 * once the wait returned): its entry is gone from the tables by then, and
 * si_pid would be 0 (M5). The last REAPED_RING children this process
 * reaped are kept here as (virtual, system) pairs, consulted for a
 * SIGCHLD's si_pid when the tables miss. Process memory, not the tables:
 * a child's SIGCHLD goes to its parent, which reaps it. Each pair one
 * 64-bit word, written and read whole (lock-free, async-signal-safe, no
 * allocation).
 *
 * The ring is of one process: `owner` names it by its system PID and the
 * restore generation it claimed the ring in (appshot_restore_generation),
 * so a fork child (its own copy of the memory) or a restore (other system
 * ids, the pairs' old) finds another and claims it afresh, never taking
 * the pairs of its parent or of the old node. A claim is a compare-and-
 * swap to a claiming mark, then the pairs emptied, then the owner
 * published: of two claimers one wins, and a reader sees its own name
 * only once the old pairs are gone. The loser (another thread of the
 * same process in the same instant) notes nothing this once: never a
 * wait. A claim holds every signal off (reaped_claim), so no handler of
 * its own thread comes between, nor leaves it half done.
 *
 * A process that shares its memory with another (a CLONE_VM child that
 * is not a thread, g_reaped_shared) shares the ring with it too: neither
 * takes it from the other while the owner is of this generation (a claim
 * would empty the owner's pairs, and one in flight would land among the
 * other's pairs: another process's children, which a reused system PID
 * would name). The one that does not own it notes nothing, and its late
 * SIGCHLD names no child (0, as before the ring), rather than another's.
 * A writer that finds the owner changed under its store takes its pair
 * back. */
#define REAPED_RING 32u /* a power of two: the index wraps with the counter */
#define REAPED_CLAIMING (1ull << 63)
static uint64_t g_reaped[REAPED_RING];
static uint32_t g_reaped_next;
static uint64_t g_reaped_owner;
/* Set for good, in the memory itself, once a process shares it with a
 * child that is not a thread (CLONE_VM without CLONE_THREAD); a fork
 * child's own copy starts without it (child_reset_ids). A CLONE_VFORK
 * child is none: its parent waits until it execs or exits. */
int g_reaped_shared;

static void reaped_shared_by(unsigned long flags) {
  if ((flags & (CLONE_VM | CLONE_THREAD | CLONE_VFORK)) == CLONE_VM && !__atomic_load_n(&g_reaped_shared, __ATOMIC_RELAXED))
    __atomic_store_n(&g_reaped_shared, 1, __ATOMIC_SEQ_CST);
}

/* This process's name in `owner`. */
static uint64_t reaped_me(void) {
  uint64_t gen = (uint64_t)__atomic_load_n(&appshot_restore_generation, __ATOMIC_RELAXED) & 0x7fffffffu;
  return gen << 32 | (uint32_t)self_spid();
}

/* The virtual PID of the newest pair of system PID `sid` in the ring,
 * whoever owns it, or 0. */
static pid_t reaped_find(int32_t sid) {
  uint32_t next = __atomic_load_n(&g_reaped_next, __ATOMIC_ACQUIRE);
  for (uint32_t k = 1; k <= REAPED_RING; k++) { /* the newest first */
    uint64_t e = __atomic_load_n(&g_reaped[(next - k) % REAPED_RING], __ATOMIC_ACQUIRE);
    if (e && (int32_t)(uint32_t)e == sid) return (pid_t)(int32_t)(e >> 32);
  }
  return 0;
}

static void late_sigchld_find(void);

/* Whether the ring is ours, claimed now if it may be. */
static int reaped_claim(uint64_t me) {
  uint64_t was = __atomic_load_n(&g_reaped_owner, __ATOMIC_ACQUIRE);
  if (was == me) return 1;
  if (was == (me | REAPED_CLAIMING)) return 0; /* another of our threads */
  /* 0: never claimed. */
  if (was && __atomic_load_n(&g_reaped_shared, __ATOMIC_SEQ_CST) && (was & ~REAPED_CLAIMING) >> 32 == me >> 32) return 0;
  /* Every signal blocked while the claiming mark is up: a handler that
   * left by siglongjmp would leave the mark for good (until the next
   * restore), and no later claim of this process would take the ring
   * (review 243). Nothing else abandons a claim: the claimer's thread
   * dies only with its process, and a fork child, whose copy may hold
   * the mark, is another process and claims afresh. Two system calls,
   * once per process and restore: smaller than a claimer's TID in the
   * mark, which would need a look for a thread gone (tgkill, a reused
   * TID) and a take-over of our own thread's abandoned claim. */
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);
  late_sigchld_find(); /* before the old node's pairs go */
  int won = __atomic_compare_exchange_n(&g_reaped_owner, &was, me | REAPED_CLAIMING, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE);
  if (won) {
    test_pause("reaped-claiming");
    for (uint32_t i = 0; i < REAPED_RING; i++) __atomic_store_n(&g_reaped[i], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_reaped_owner, me, __ATOMIC_RELEASE);
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  return won;
}

static void reaped_note(pid_t vid, pid_t sid) {
  uint64_t me = reaped_me();
  if (!reaped_claim(me)) return;
  uint64_t pair = ((uint64_t)(uint32_t)vid << 32) | (uint32_t)sid;
  uint32_t i = __atomic_fetch_add(&g_reaped_next, 1, __ATOMIC_RELAXED) % REAPED_RING;
  __atomic_store_n(&g_reaped[i], pair, __ATOMIC_SEQ_CST);
  /* Claimed by another since the check: it may have emptied the ring
   * before our store, so the pair is taken back (unless overwritten). */
  if (__atomic_load_n(&g_reaped_owner, __ATOMIC_SEQ_CST) != me)
    __atomic_compare_exchange_n(&g_reaped[i], &pair, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

/* The virtual PID of the child of system PID `sid` this process reaped
 * last, or 0. */
static pid_t reaped_s2v(int32_t sid) {
  if (sid <= 0 || __atomic_load_n(&g_reaped_owner, __ATOMIC_ACQUIRE) != reaped_me()) return 0;
  return reaped_find(sid);
}

/* --- A late SIGCHLD across a restore ---------------------------------------
 *
 * A SIGCHLD pending at a snapshot for a child reaped before it names the
 * child by its system PID on the old node, which no table maps: the
 * restore queues it again with si_pid 0, which harms no reader (pending
 * signals survive exec: a program exec'd after the restore reads it too,
 * and a negative or made-up PID there would be one it may kill()), and
 * writes here, by this symbol (src/resources/signals.ts), the old system
 * PIDs of the child and of this process. The pair the ring kept for the
 * child is in the memory the image gave back: while the ring is still
 * the old node's and ours (its owner's PID this process's old one, not
 * a sharer's), the child's virtual PID is found there, before the first
 * claim of this node empties it (reaped_claim looks first). A SIGCHLD of
 * a child (si_code > 0) with si_pid 0 is named so once; the next one
 * names nobody, as before. A fork child, which inherits no pending
 * signal, forgets it (child_reset_ids). */
struct appshot_late_sigchld {
  int32_t child; /* the restore's: the child's old system PID, 0 for none */
  int32_t self;  /* the restore's: this process's old system PID */
  int32_t vpid;  /* ours: the child's virtual PID, once found */
  int32_t reserved;
};
static struct appshot_late_sigchld g_late_sigchld;
extern struct appshot_late_sigchld appshot_late_sigchld
    __attribute__((alias("g_late_sigchld"), visibility("default")));

/* The late SIGCHLD's child looked up in the ring the image gave back. */
static void late_sigchld_find(void) {
  int32_t child = __atomic_load_n(&g_late_sigchld.child, __ATOMIC_ACQUIRE);
  if (child <= 0 || __atomic_load_n(&g_late_sigchld.vpid, __ATOMIC_ACQUIRE)) return;
  uint64_t owner = __atomic_load_n(&g_reaped_owner, __ATOMIC_ACQUIRE);
  if ((owner & REAPED_CLAIMING) || (int32_t)(uint32_t)owner != __atomic_load_n(&g_late_sigchld.self, __ATOMIC_RELAXED)) return;
  int32_t v = reaped_find(child);
  if (v > 0) __atomic_store_n(&g_late_sigchld.vpid, v, __ATOMIC_RELEASE);
}

/* The virtual PID of a SIGCHLD's child that came back with si_pid 0, once. */
static pid_t late_sigchld_take(void) {
  late_sigchld_find();
  int32_t v = __atomic_exchange_n(&g_late_sigchld.vpid, 0, __ATOMIC_ACQ_REL);
  if (v) __atomic_store_n(&g_late_sigchld.child, 0, __ATOMIC_RELEASE);
  return v;
}

void late_sigchld_forget(void) {
  if (g_late_sigchld.child || g_late_sigchld.vpid) memset(&g_late_sigchld, 0, sizeof g_late_sigchld);
}

/* --- Waiting -------------------------------------------------------------- */

/* The virtual id of a child that a wait call returned; the entry goes if
 * the call reaped it (the system PID is free from now on). */
static pid_t waited(pid_t sid, int reaped) {
  pid_t v = adopt(sid);
  if (reaped) {
    /* Noted before the entry goes: a SIGCHLD read on another thread in
     * between finds the pair in one or the other (review35a). */
    reaped_note(v, sid);
    appshot_forget_process(g_h, sid);
  }
  return v;
}

/* The child's virtual PID for a system PID that an answer written where
 * `where` says gave (appshot_table.h, "Wait calls across a restore"),
 * looked up without removing anything, so that a restore before the
 * caller's re-check loses nothing: a system PID of the node before the
 * last restore is translated through that node's PIDs (*from_prior), and
 * nothing of this node's tables is touched for it (it may name another
 * process here). One of an earlier node, or one the node before never
 * mapped, is translated as before, which may be wrong. A child not mapped
 * yet is mapped (*made). */
static pid_t look_up_waited(enum appshot_wait_origin where, pid_t sid,
                            int *from_prior, int *made) {
  int32_t v;
  *from_prior = *made = 0;
  if (where == APPSHOT_WAIT_BEFORE && appshot_prior_s2v(g_h, sid, &v)) {
    *from_prior = 1;
    return v;
  }
  if (appshot_s2v(g_h, APPSHOT_PID, sid, &v)) return v;
  v = appshot_map_system(g_h, APPSHOT_PID, sid, 0, 0);
  if (v < 0) return sid;
  *made = 1;
  return v;
}

/* A wait call that reported a child, given the system PID the kernel
 * answered with (wait4) or the offset of si_pid in the answer (waitid,
 * `sid_at` >= 0): copies the answer (rusage or siginfo, `len` bytes) to
 * `copy` and returns the child's virtual PID, and if the call reaped the
 * child, drops its entry. A restore that comes while this runs moves the
 * answer: translated again, from where it now is; the entry is dropped
 * only once the pair is known to be of the node the answer came from, and
 * only that pair (a restore in between leaves the pair of an old node,
 * which must not take another process's entry with it). */
static pid_t wait_answer(int slot, pid_t sid, long sid_at, int reaped,
                         void *copy, size_t len) {
  const void *answer;
  enum appshot_wait_origin where = appshot_wait_origin(g_h, slot, &answer);
  for (;;) {
    memcpy(copy, answer, len);
    if (sid_at >= 0) memcpy(&sid, (const char *)copy + sid_at, sizeof sid);
    int from_prior, made;
    pid_t v = look_up_waited(where, sid, &from_prior, &made);
    test_pause("wait-looked-up");
    const void *now_answer;
    enum appshot_wait_origin now = appshot_wait_origin(g_h, slot, &now_answer);
    if (now == where) {
      if (reaped && from_prior) {
        appshot_prior_forget(g_h, v, sid);
      } else if (reaped) {
        reaped_note(v, sid);
        appshot_forget_pair(g_h, v, sid);
      }
      return v;
    }
    /* Moved: what this node's tables were given for an old node's PID
     * goes (only that pair, as above). */
    if (made) appshot_unmap_pair(g_h, APPSHOT_PID, v, sid);
    where = now;
    answer = now_answer;
  }
}

/* Copies the pieces `from` (at their offsets from the first) to the
 * caller's `dst` as the kernel would have: an
 * address the caller may not write fails with EFAULT (returns it) instead
 * of a SIGSEGV in our code. Asked of the kernel itself, process_vm_writev
 * on ourselves: only on the wait calls' paths that copy an answer, and
 * plain memcpy where the call is not allowed (seccomp, no such call). */
static int copy_out(void *dst, const struct iovec *from, int n) {
  struct iovec to[2];
  long total = 0;
  for (int i = 0; i < n; i++) {
    to[i].iov_base = (char *)dst + ((const char *)from[i].iov_base - (const char *)from[0].iov_base);
    to[i].iov_len = from[i].iov_len;
    total += (long)from[i].iov_len;
  }
  long r = SYS6(process_vm_writev, self_spid(), from, n, to, n, 0);
  if (r == total) return 0;
  /* Short: a later element faulted (the call stops there). */
  if (r >= 0 || r == -EFAULT) return EFAULT;
  for (int i = 0; i < n; i++) memcpy(to[i].iov_base, from[i].iov_base, from[i].iov_len);
  return 0;
}

long do_wait4(pid_t pid, int *status, int options, struct rusage *ru) {
  ID_WINDOW();
  pid_t sid;
  int e = pid_arg(pid, &sid, ECHILD);
  if (e) return fail(e);
  int st;
  /* The kernel writes the child's rusage into the slot: how we know, after
   * a restore, on which node the call ran (appshot_table.h). */
  /* The only window open on this thread is this call's: no other wait of
   * the thread is in progress, so a slot it still holds was left by a
   * siglongjmp out of an earlier one (preload.h, translation windows). */
  int slot = appshot_wait_begin(g_h, self_vtid(), t_id_window.open == 1);
  struct rusage *kru = slot >= 0 ? appshot_wait_out(g_h, slot) : ru;
  pid_t r = REAL(wait4)(sid, status ? status : &st, options, kru);
  /* A wait for one process (or group), snapshotted while it blocked and
   * restored: the restore rewrites the id the call restarts with
   * (src/resources/blocked.ts); should the kernel still say ECHILD (a
   * restore that could not, a raw restart), that process is here under a
   * new id. */
  pid_t again;
  while (r < 0 && errno == ECHILD && (pid > 0 || pid < -1) && !pid_arg(pid, &again, ECHILD) &&
         again != sid) {
    sid = again;
    r = REAL(wait4)(sid, status ? status : &st, options, kru);
  }
  /* A process forked by a signal handler that ran during the call comes
   * back here with its parent's slot number: not its slot, not its to use
   * or give back. */
  if (slot >= 0 && !appshot_wait_held(g_h, slot, self_vtid())) slot = -1;
  if (r <= 0) {
    int err = errno;
    if (slot >= 0) appshot_wait_end(g_h, slot, self_vtid());
    errno = err;
    return r;
  }
  test_pause("wait-answered");
  int s = status ? *status : st;
  int reaped = WIFEXITED(s) || WIFSIGNALED(s);
  pid_t v;
  if (slot >= 0) {
    struct rusage got;
    v = wait_answer(slot, r, -1, reaped, &got, sizeof got);
    appshot_wait_end(g_h, slot, self_vtid());
    struct iovec from = {&got, sizeof got};
    /* The child is reaped all the same, as the kernel does. */
    if (ru && copy_out(ru, &from, 1)) return fail(EFAULT);
  } else {
    v = waited(r, reaped);
  }
  /* Waited for one process by its id: that is the answer, known without
   * the tables. */
  return pid > 0 ? pid : v;
}

API pid_t wait4(pid_t pid, int *status, int options, struct rusage *ru) {
  ensure_init();
  if (!g_h) return REAL(wait4)(pid, status, options, ru);
  return (pid_t)do_wait4(pid, status, options, ru);
}

API pid_t waitpid(pid_t pid, int *status, int options) {
  return wait4(pid, status, options, NULL);
}

API pid_t wait(int *status) { return wait4(-1, status, 0, NULL); }

API pid_t wait3(int *status, int options, struct rusage *ru) {
  return wait4(-1, status, options, ru);
}

static int waitid_call(idtype_t idtype, pid_t sid, siginfo_t *info,
                       int options, struct rusage *ru) {
  /* glibc's waitid has no rusage: only the raw syscall gets one. */
  if (ru) return (int)libc_ret(SYS5(waitid, idtype, sid, info, options, ru));
  return REAL(waitid)(idtype, (id_t)sid, info, options);
}

/* What the kernel writes of a waitid siginfo (kernel/exit.c): si_signo,
 * si_errno and si_code, then si_pid, si_uid and si_status; the rest of the
 * caller's siginfo stays as it was. */
#define WAITID_HEAD offsetof(siginfo_t, si_code) + sizeof(int)
#define WAITID_BODY (offsetof(siginfo_t, si_status) + sizeof(int) - offsetof(siginfo_t, si_pid))

/* The fields above, from `got` into the caller's `info`. */
static int waitid_copy_out(siginfo_t *info, siginfo_t *got) {
  struct iovec from[2] = {{got, WAITID_HEAD},
                          {&got->si_pid, WAITID_BODY}};
  return copy_out(info, from, 2);
}

long do_waitid(idtype_t idtype, id_t id, siginfo_t *info, int options,
               struct rusage *ru) {
  ID_WINDOW();
  pid_t sid = (pid_t)id;
  if ((idtype == P_PID || idtype == P_PGID) && (pid_t)id > 0 &&
      !v2s_pid((pid_t)id, &sid))
    return fail(ECHILD);
  siginfo_t local;
  /* The kernel writes the siginfo into the slot (see do_wait4). */
  /* The only window open on this thread is this call's: no other wait of
   * the thread is in progress, so a slot it still holds was left by a
   * siglongjmp out of an earlier one (preload.h, translation windows). */
  int slot = appshot_wait_begin(g_h, self_vtid(), t_id_window.open == 1);
  siginfo_t *kinfo = slot >= 0 ? appshot_wait_out(g_h, slot) : info ? info : &local;
  if (slot < 0) kinfo->si_pid = 0;
  int r = waitid_call(idtype, sid, kinfo, options, ru);
  /* As in do_wait4: restarted after a restore with the old node's id. */
  pid_t again;
  while (r < 0 && errno == ECHILD && (idtype == P_PID || idtype == P_PGID) && (pid_t)id > 0 &&
         v2s_pid((pid_t)id, &again) && again != sid) {
    sid = again;
    r = waitid_call(idtype, sid, kinfo, options, ru);
  }
  int err = errno;
  if (slot >= 0 && !appshot_wait_held(g_h, slot, self_vtid())) {
    /* See do_wait4: a process forked by a signal handler. Whatever its
     * call wrote went to its parent's slot, which it may not read. */
    errno = err;
    return r;
  }
  if (slot < 0) {
    if (r != 0 || kinfo->si_pid == 0) {
      errno = err;
      return r;
    }
    test_pause("wait-answered");
    int reaped = (options & WEXITED) && !(options & WNOWAIT) &&
                 (kinfo->si_code == CLD_EXITED || kinfo->si_code == CLD_KILLED ||
                  kinfo->si_code == CLD_DUMPED);
    kinfo->si_pid = waited(kinfo->si_pid, reaped);
    return 0;
  }
  /* Still marked, the kernel wrote nothing (an EFAULT of `ru`); it writes
   * the siginfo on other errors too (zeroes), as on success. */
  const void *answer;
  appshot_wait_origin(g_h, slot, &answer);
  siginfo_t got;
  memcpy(&got, answer, sizeof got);
  int written = *(const uint64_t *)answer != UINT64_MAX;
  if (r != 0 || !written || got.si_pid == 0) {
    appshot_wait_end(g_h, slot, self_vtid());
    if (written && info && waitid_copy_out(info, &got)) return fail(EFAULT);
    errno = err;
    return r;
  }
  test_pause("wait-answered");
  int reaped = (options & WEXITED) && !(options & WNOWAIT) &&
               (got.si_code == CLD_EXITED || got.si_code == CLD_KILLED ||
                got.si_code == CLD_DUMPED);
  got.si_pid = wait_answer(slot, 0, offsetof(siginfo_t, si_pid), reaped, &got, sizeof got);
  appshot_wait_end(g_h, slot, self_vtid());
  /* The child is reaped all the same, as the kernel does. */
  if (info && waitid_copy_out(info, &got)) return fail(EFAULT);
  return 0;
}

API int waitid(idtype_t idtype, id_t id, siginfo_t *info, int options) {
  ensure_init();
  if (!g_h) return REAL(waitid)(idtype, id, info, options);
  return (int)do_waitid(idtype, id, info, options, NULL);
}

/* si_pid means a sender or a child only for these codes; for the others
 * the same bytes hold a timer id or a band. */
void translate_si_pid(siginfo_t *info) {
  int c = info->si_code;
  if (c == SI_USER || c == SI_QUEUE || c == SI_TKILL || c == SI_MESGQ ||
      (info->si_signo == SIGCHLD && c > 0)) {
    int32_t v;
    if (appshot_s2v(g_h, APPSHOT_PID, info->si_pid, &v)) info->si_pid = v;
    else if (info->si_signo == SIGCHLD && c > 0) info->si_pid = info->si_pid ? reaped_s2v(info->si_pid) : late_sigchld_take();
    else info->si_pid = 0;
  }
}

API int sigtimedwait(const sigset_t *set, siginfo_t *info,
                     const struct timespec *timeout) {
  ID_WINDOW();
  ensure_init();
  int r = REAL(sigtimedwait)(set, info, timeout);
  if (r > 0 && info && g_h) translate_si_pid(info);
  return r;
}

long do_rt_sigtimedwait(const sigset_t *set, siginfo_t *info,
                        const struct timespec *timeout, size_t size) {
  ID_WINDOW();
  long r = libc_ret(SYS4(rt_sigtimedwait, set, info, timeout, size));
  if (r > 0 && info) translate_si_pid(info);
  return r;
}

API int sigwaitinfo(const sigset_t *set, siginfo_t *info) {
  ID_WINDOW();
  ensure_init();
  int r = REAL(sigwaitinfo)(set, info);
  if (r > 0 && info && g_h) translate_si_pid(info);
  return r;
}

/* --- Signals -------------------------------------------------------------- */

/* The init is the application's supervisor: it may be asked whether it is
 * there, not told what to do. */
static int init_refuses(pid_t vid, int sig) { return vid == VINIT && sig != 0; }

/* kill(-1): every process of the application, not every one of the user.
 * Only the slots in the pages that hold entries are read, found with
 * lseek(SEEK_DATA) on our descriptor of the table file (appshot_used.h:
 * raw system calls, async-signal-safe, a few words of stack); a read of
 * all 8192 through the mapping allocated the file's holes. Not the scan
 * API, which stops at the count and may miss a process while others come
 * and go. Without the descriptor (no free number for it, preload_fd.c),
 * every slot, as before. */
static long kill_application(int sig) {
  pid_t self = self_spid();
  int32_t vid, sid;
  uint32_t flags;
  int sent = 0;
  struct appshot_used u;
  appshot_used_begin(&u, g_h, __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED), APPSHOT_PID);
  for (int64_t s; (s = appshot_used_next(&u)) >= 0;)
    if (appshot_entry_at(g_h, APPSHOT_PID, (uint32_t)s, &vid, &sid, &flags, NULL) &&
        !(flags & (APPSHOT_F_THREAD | APPSHOT_F_INIT)) && sid != self &&
        SYS2(kill, sid, sig) == 0)
      sent = 1;
  return sent ? 0 : fail(ESRCH);
}

long do_kill(pid_t pid, int sig) {
  ID_WINDOW();
  if (pid == -1) return kill_application(sig);
  pid_t sid;
  int e = pid_arg(pid, &sid, ESRCH);
  if (e) return fail(e);
  if (init_refuses(pid, sig)) return fail(EPERM);
  test_pause("kill-translated");
  return libc_ret(SYS2(kill, sid, sig));
}

API int kill(pid_t pid, int sig) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(kill, pid, sig));
  return (int)do_kill(pid, sig);
}

API int killpg(pid_t pgrp, int sig) {
  if (pgrp < 0) return (int)fail(EINVAL);
  return kill(-pgrp, sig);
}

long do_tgkill(long nr, pid_t tgid, pid_t tid, int sig) {
  ID_WINDOW();
  pid_t stgid = 0, stid;
  if (nr == SYS_tgkill && proc_arg(tgid, &stgid, ESRCH)) return fail(ESRCH);
  if (proc_arg(tid, &stid, ESRCH)) return fail(ESRCH);
  if (init_refuses(tid, sig)) return fail(EPERM);
  return nr == SYS_tgkill ? libc_ret(SYS3(tgkill, stgid, stid, sig))
                          : libc_ret(SYS2(tkill, stid, sig));
}

API int tgkill(pid_t tgid, pid_t tid, int sig) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS3(tgkill, tgid, tid, sig));
  return (int)do_tgkill(SYS_tgkill, tgid, tid, sig);
}

/* pthread_kill, pthread_sigqueue and raise send to a thread by its system
 * TID, which glibc reads from the thread's descriptor (or asks gettid for)
 * and holds in a register up to its own tgkill or rt_tgsigqueueinfo,
 * which no wrapper of ours sees: a snapshot that stopped the thread in
 * between had it resume on the new node sending to the old TID (ESRCH
 * from pthread_sigqueue in rtorder, once in a fresh-clone run; another
 * process's thread, had the number been taken). Inside an id window, a
 * snapshot lets the thread run on until the call has returned
 * (src/ptrace/windows.ts): the descriptor holds the new TID from then on.
 * Not for a stop signal: a program stopping itself (raise(SIGTSTP) in its
 * SIGTSTP handler, as shells' children do) stops as the call returns, and
 * a thread stopped by job control inside a window cannot be let run on:
 * the snapshot would be refused. Once stopped there, its call is done. */
static int stops(int sig) {
  return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

API int pthread_kill(pthread_t thread, int sig) {
  ensure_init();
  int (*real)(pthread_t, int) = REAL(pthread_kill);
  if (!real) return ENOSYS;
  ID_WINDOW_IF(!stops(sig));
  return real(thread, sig);
}

API int pthread_sigqueue(pthread_t thread, int sig, const union sigval value) {
  ensure_init();
  int (*real)(pthread_t, int, const union sigval) = REAL(pthread_sigqueue);
  if (!real) return ENOSYS;
  ID_WINDOW_IF(!stops(sig));
  return real(thread, sig, value);
}

API int raise(int sig) {
  ensure_init();
  int (*real)(int) = REAL(raise);
  if (!real) return (int)fail(ENOSYS);
  ID_WINDOW_IF(!stops(sig));
  return real(sig);
}

API int sigqueue(pid_t pid, int sig, const union sigval val) {
  ID_WINDOW();
  ensure_init();
  pid_t sid = pid;
  if (g_h) {
    if (proc_arg(pid, &sid, ESRCH)) return (int)fail(ESRCH);
    if (init_refuses(pid, sig)) return (int)fail(EPERM);
  }
  return REAL(sigqueue)(sid, sig, val);
}

long do_sigqueueinfo(long nr, pid_t tgid, pid_t tid, int sig,
                     siginfo_t *info) {
  ID_WINDOW();
  pid_t stgid, stid = 0;
  if (proc_arg(tgid, &stgid, ESRCH)) return fail(ESRCH);
  if (nr == SYS_rt_tgsigqueueinfo && proc_arg(tid, &stid, ESRCH))
    return fail(ESRCH);
  if (init_refuses(nr == SYS_rt_tgsigqueueinfo ? tid : tgid, sig))
    return fail(EPERM);
  /* The sender's PID in the siginfo is the caller's to fill (sigqueue
   * fills it with getpid(), which the application sees virtual); the
   * receiver is told it as the system's, and its own side makes it
   * virtual again (review33 L8: it read a virtual one as a system one).
   * The caller's siginfo stays as it gave it, and is read as the kernel
   * would read it: a bad address is the kernel's EFAULT, not our fault. */
  siginfo_t sent;
  pid_t spid;
  if (info && copy_in(&sent, info, sizeof sent) == 0 &&
      sent.si_code < 0 && sent.si_pid > 0 && v2s_pid(sent.si_pid, &spid)) {
    sent.si_pid = spid;
    info = &sent;
  }
  return nr == SYS_rt_tgsigqueueinfo
             ? libc_ret(SYS4(rt_tgsigqueueinfo, stgid, stid, sig, info))
             : libc_ret(SYS3(rt_sigqueueinfo, stgid, sig, info));
}

API int pidfd_open(pid_t pid, unsigned int flags) {
  ID_WINDOW();
  ensure_init();
  pid_t sid = pid;
  if (g_h && proc_arg(pid, &sid, ESRCH)) return (int)fail(ESRCH);
  return (int)libc_ret(SYS2(pidfd_open, sid, flags));
}

/* --- Process groups and sessions ------------------------------------------ */

long do_getpgid(pid_t pid) {
  ID_WINDOW();
  pid_t sid;
  if (proc_arg(pid, &sid, ESRCH)) return fail(ESRCH);
  long r = libc_ret(SYS1(getpgid, sid));
  return r < 0 ? r : s2v_or0(APPSHOT_PID, (int32_t)r);
}

long do_getsid(pid_t pid) {
  ID_WINDOW();
  pid_t sid;
  if (proc_arg(pid, &sid, ESRCH)) return fail(ESRCH);
  long r = libc_ret(SYS1(getsid, sid));
  return r < 0 ? r : s2v_or0(APPSHOT_PID, (int32_t)r);
}

long do_setpgid(pid_t pid, pid_t pgid) {
  ID_WINDOW();
  pid_t spid, spgid;
  if (proc_arg(pid, &spid, ESRCH)) return fail(ESRCH);
  if (proc_arg(pgid, &spgid, EPERM)) return fail(EPERM);
  return libc_ret(SYS2(setpgid, spid, spgid));
}

long do_setsid(void) {
  long r = libc_ret(SYS0(setsid));
  return r < 0 ? r : self_vpid();
}

API pid_t getpgid(pid_t pid) {
  ensure_init();
  if (!g_h) return (pid_t)libc_ret(SYS1(getpgid, pid));
  return (pid_t)do_getpgid(pid);
}

API pid_t getsid(pid_t pid) {
  ensure_init();
  if (!g_h) return (pid_t)libc_ret(SYS1(getsid, pid));
  return (pid_t)do_getsid(pid);
}

API pid_t getpgrp(void) { return getpgid(0); }

API int setpgid(pid_t pid, pid_t pgid) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(setpgid, pid, pgid));
  return (int)do_setpgid(pid, pgid);
}

API pid_t setsid(void) {
  ensure_init();
  if (!g_h) return (pid_t)libc_ret(SYS0(setsid));
  return (pid_t)do_setsid();
}

static long refuse_set(int fd, unsigned int cmd, int err);

static pid_t tty_id(int fd, unsigned long req) {
  ID_WINDOW();
  ensure_init();
  pid_t id;
  if (libc_ret(SYS3(ioctl, fd, req, &id)) < 0) return -1;
  return g_h ? s2v_or0(APPSHOT_PID, id) : id;
}

API pid_t tcgetpgrp(int fd) { return tty_id(fd, TIOCGPGRP); }
API pid_t tcgetsid(int fd) { return tty_id(fd, TIOCGSID); }

static long ioctl_call(int raw, int fd, unsigned long req, void *arg);

/* TIOCSPGRP of a group the tables do not know: EPERM, as for a group of
 * another session, but only where the kernel would get that far. Before
 * it looks at the group, it stops a caller in the background of its
 * controlling terminal (SIGTTOU to its group, not ignored or blocked:
 * the call is made again once the caller is continued) and fails one in
 * an orphaned group with ENOTTY; then it reads the id (EFAULT) and
 * refuses a negative one (EINVAL). So the kernel is handed -1 first: its
 * EINVAL says every earlier check passed, and nothing changed; any other
 * answer is the kernel's own. */
static long unknown_group_set(int raw, int fd, unsigned long req) {
  pid_t invalid = -1;
  long r = ioctl_call(raw, fd, req, &invalid);
  if (r < 0 && errno != EINVAL) return r;
  return refuse_set(fd, TIOCSPGRP, EPERM);
}

API int tcsetpgrp(int fd, pid_t pgrp) {
  ID_WINDOW();
  ensure_init();
  pid_t sid = pgrp;
  if (g_h && proc_arg(pgrp, &sid, EPERM)) return (int)unknown_group_set(1, fd, TIOCSPGRP);
  return (int)libc_ret(SYS3(ioctl, fd, TIOCSPGRP, &sid));
}

/* --- Calls that name a process to act on ---------------------------------- */

/* Any system call whose first argument is a PID (0 = the caller). */
long do_pid_first(long nr, long pid, long b, long c, long d, long e, long f) {
  ID_WINDOW();
  pid_t sid = (pid_t)pid;
  if (g_h && proc_arg((pid_t)pid, &sid, ESRCH)) return fail(ESRCH);
  return libc_ret(appshot_raw_syscall(nr, sid, b, c, d, e, f));
}

#define PID_FIRST(ret, name, params, ...)                     \
  API ret name params {                                       \
    ensure_init();                                            \
    return (ret)do_pid_first(SYS_##name, pid, __VA_ARGS__);   \
  }
#define L(x) ((long)(x))

PID_FIRST(int, sched_setscheduler,
          (pid_t pid, int policy, const struct sched_param *p), policy, L(p),
          0, 0, 0)
PID_FIRST(int, sched_getscheduler, (pid_t pid), 0, 0, 0, 0, 0)
PID_FIRST(int, sched_setparam, (pid_t pid, const struct sched_param *p), L(p),
          0, 0, 0, 0)
PID_FIRST(int, sched_getparam, (pid_t pid, struct sched_param *p), L(p), 0, 0,
          0, 0)
PID_FIRST(int, sched_rr_get_interval, (pid_t pid, struct timespec *t), L(t), 0,
          0, 0, 0)
PID_FIRST(ssize_t, process_vm_readv,
          (pid_t pid, const struct iovec *l, unsigned long nl,
           const struct iovec *r, unsigned long nr, unsigned long flags),
          L(l), L(nl), L(r), L(nr), L(flags))
PID_FIRST(ssize_t, process_vm_writev,
          (pid_t pid, const struct iovec *l, unsigned long nl,
           const struct iovec *r, unsigned long nr, unsigned long flags),
          L(l), L(nl), L(r), L(nr), L(flags))

API int prlimit(pid_t pid, enum __rlimit_resource res, const struct rlimit *nl,
                struct rlimit *ol) {
  ensure_init();
  return (int)do_pid_first(SYS_prlimit64, pid, res, L(nl), L(ol), 0, 0);
}

API int prlimit64(pid_t pid, enum __rlimit_resource res,
                  const struct rlimit64 *nl, struct rlimit64 *ol) {
  ensure_init();
  return (int)do_pid_first(SYS_prlimit64, pid, res, L(nl), L(ol), 0, 0);
}

/* prctl's options that name a process (the rest pass as they are):
 *  - PR_SET_PTRACER (Yama): the process allowed to ptrace the caller.
 *    0 (none) and -1 (PR_SET_PTRACER_ANY, also as an int) stay; Yama
 *    reads the rest as a pid_t and refuses one it cannot find with
 *    EINVAL, which a virtual PID the tables do not know gets here too:
 *    handed on, it would name whatever system process has that number.
 *  - PR_SCHED_CORE: arg3, a PID, TID or process group by the scope in
 *    arg4 (all in the PID table); 0 is the caller, a negative one the
 *    kernel's to refuse, one it cannot find ESRCH. */
long do_prctl(long option, long a, long b, long c, long d) {
  ID_WINDOW_IF(g_h && (option == PR_SET_PTRACER || option == PR_SCHED_CORE));
  if (g_h && option == PR_SET_PTRACER && (int)a > 0) {
    pid_t sid;
    if (!v2s_pid((pid_t)a, &sid)) return fail(EINVAL);
    a = sid;
  } else if (g_h && option == PR_SCHED_CORE && (int)b > 0) {
    pid_t sid;
    if (!v2s_pid((pid_t)b, &sid)) return fail(ESRCH);
    b = sid;
  }
  return libc_ret(SYS5(prctl, option, a, b, c, d));
}

/* glibc's prctl is the bare system call, which takes four more arguments
 * whatever the option (unused ones are read from registers, as glibc
 * does). */
API int prctl(int option, ...) {
  va_list ap;
  va_start(ap, option);
  long a = va_arg(ap, long), b = va_arg(ap, long);
  long c = va_arg(ap, long), d = va_arg(ap, long);
  va_end(ap);
  ensure_init();
  return (int)do_prctl(option, a, b, c, d);
}

API SYMVER("sched_getaffinity@@GLIBC_2.3.4")
int appshot_current_sched_getaffinity(pid_t pid, size_t size, cpu_set_t *set) {
  ensure_init();
  long r = do_pid_first(SYS_sched_getaffinity, pid, L(size), L(set), 0, 0, 0);
  if (r < 0) return -1;
  /* As glibc: the kernel fills only its own mask size, the rest is 0. */
  memset((char *)set + r, 0, size - (size_t)r);
  return 0;
}

/* sched_getaffinity@GLIBC_2.3.3, before the mask's size was an argument
 * (2.3.4): a mask of 1024 CPUs. glibc's function of that version is this
 * call of the current one; taken by the current wrapper instead, the
 * mask's address would be read as its size and a stray register as the
 * mask. */
COMPAT_VERSION("sched_getaffinity@GLIBC_2.3.3")
int appshot_compat_sched_getaffinity_2_3_3(pid_t pid, cpu_set_t *set) {
  return appshot_current_sched_getaffinity(pid, 128, set);
}

API SYMVER("sched_setaffinity@@GLIBC_2.3.4")
int appshot_current_sched_setaffinity(pid_t pid, size_t size,
                                      const cpu_set_t *set) {
  ensure_init();
  return (int)do_pid_first(SYS_sched_setaffinity, pid, L(size), L(set), 0, 0,
                           0);
}

/* sched_setaffinity@GLIBC_2.3.3, the same before the size argument: glibc's
 * function of that version calls the current one with a mask of 1024 CPUs.
 * Taken by the current wrapper, the mask's address was read as its size
 * (EFAULT, or another mask). */
COMPAT_VERSION("sched_setaffinity@GLIBC_2.3.3")
int appshot_compat_sched_setaffinity_2_3_3(pid_t pid, const cpu_set_t *set) {
  return appshot_current_sched_setaffinity(pid, 128, set);
}

/* Raw kernel convention for getpriority (20 - nice); libc converts. */
long do_prio(long nr, long which, long who, long prio) {
  ID_WINDOW();
  pid_t sid = (pid_t)who;
  if (g_h && (which == PRIO_PROCESS || which == PRIO_PGRP) &&
      proc_arg((pid_t)who, &sid, ESRCH))
    return fail(ESRCH);
  return libc_ret(appshot_raw_syscall(nr, which, sid, prio, 0, 0, 0));
}

API int getpriority(__priority_which_t which, id_t who) {
  ensure_init();
  long r = do_prio(SYS_getpriority, which, who, 0);
  return r < 0 ? -1 : 20 - (int)r;
}

API int setpriority(__priority_which_t which, id_t who, int prio) {
  ensure_init();
  return (int)do_prio(SYS_setpriority, which, who, prio);
}

/* --- Capabilities, ptrace, kcmp, I/O priority, perf ------------------------ */

/* glibc exports them without declaring them (libcap's header does). */
int capget(cap_user_header_t header, cap_user_data_t data);
int capset(cap_user_header_t header, const cap_user_data_t data);

/* capget and capset name their process in the header: libcap-ng (setpriv,
 * many daemons) puts getpid() there, our virtual PID, which would be some
 * other process of the system (kthreadd for 2). The caller's header keeps
 * its virtual PID; the kernel may write its preferred version into it. */
long do_capget_set(long nr, cap_user_header_t header, void *data) {
  ID_WINDOW();
  if (!header) return libc_ret(appshot_raw_syscall(nr, 0, (long)data, 0, 0, 0, 0)); /* EFAULT */
  struct __user_cap_header_struct sys_header = *header;
  if (proc_arg(header->pid, &sys_header.pid, ESRCH)) return fail(ESRCH);
  long r = libc_ret(appshot_raw_syscall(nr, (long)&sys_header, (long)data, 0, 0, 0, 0));
  header->version = sys_header.version;
  return r;
}

API int capget(cap_user_header_t header, cap_user_data_t data) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(capget, header, data));
  return (int)do_capget_set(SYS_capget, header, data);
}

API int capset(cap_user_header_t header, const cap_user_data_t data) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(capset, header, data));
  return (int)do_capget_set(SYS_capset, header, data);
}

/* The raw call: every request but PTRACE_TRACEME names a thread. A system
 * PID, or a process of another application, is no id of ours: ESRCH, as a
 * PID namespace answers for a process outside it. */
long do_ptrace(long request, pid_t pid, void *addr, void *data) {
  ID_WINDOW();
  pid_t sid = pid;
  if (request != PTRACE_TRACEME && proc_arg(pid, &sid, ESRCH))
    return fail(ESRCH);
  return libc_ret(SYS4(ptrace, request, sid, addr, data));
}

/* glibc's wrapper, reproduced: for PTRACE_PEEKTEXT, PEEKDATA and PEEKUSER
 * (requests 1 to 3) the kernel stores the word at `data`; glibc passes its
 * own word, returns it, and sets errno to 0 on success (so that a word of
 * -1 can be told from a failure). */
API long ptrace(enum __ptrace_request request, ...) {
  va_list ap;
  va_start(ap, request);
  pid_t pid = va_arg(ap, pid_t);
  void *addr = va_arg(ap, void *);
  void *data = va_arg(ap, void *);
  va_end(ap);
  ensure_init();
  long word;
  int peek = request > 0 && request < 4;
  if (peek) data = &word;
  long r = g_h ? do_ptrace(request, pid, addr, data)
               : libc_ret(SYS4(ptrace, request, pid, addr, data));
  if (r >= 0 && peek) {
    errno = 0;
    return word;
  }
  return r;
}

/* kcmp(pid1, pid2, type, idx1, idx2): two processes. */
long do_kcmp(pid_t pid1, pid_t pid2, long type, long idx1, long idx2) {
  ID_WINDOW();
  pid_t s1, s2;
  if (proc_arg(pid1, &s1, ESRCH) || proc_arg(pid2, &s2, ESRCH))
    return fail(ESRCH);
  return libc_ret(SYS5(kcmp, s1, s2, type, idx1, idx2));
}

/* The kernel's values (linux/ioprio.h is not in every header set). */
#define IOPRIO_WHO_PROCESS 1
#define IOPRIO_WHO_PGRP 2

/* ioprio_get(which, who) and ioprio_set(which, who, ioprio): `who` is a
 * PID or a process group (0: the caller's), or a uid (IOPRIO_WHO_USER),
 * which stays as it is. */
long do_ioprio(long nr, long which, long who, long ioprio) {
  ID_WINDOW();
  pid_t sid = (pid_t)who;
  if ((which == IOPRIO_WHO_PROCESS || which == IOPRIO_WHO_PGRP) &&
      proc_arg((pid_t)who, &sid, ESRCH))
    return fail(ESRCH);
  return libc_ret(appshot_raw_syscall(nr, which, sid, ioprio, 0, 0, 0));
}

/* perf_event_open(attr, pid, cpu, group_fd, flags): pid -1 is every
 * process (on one CPU), 0 the caller; with PERF_FLAG_PID_CGROUP the
 * argument is a cgroup's descriptor, no PID. */
long do_perf_event_open(long attr, pid_t pid, long cpu, long group_fd,
                        unsigned long flags) {
  ID_WINDOW();
  pid_t sid = pid;
  if (!(flags & PERF_FLAG_PID_CGROUP) && proc_arg(pid, &sid, ESRCH))
    return fail(ESRCH);
  return libc_ret(SYS5(perf_event_open, attr, sid, cpu, group_fd, flags));
}

/* --- fcntl: a descriptor's owner and a lock's holder ---------------------- */

/* An owner for F_SETOWN: a PID, or a process group as -pgid; 0 is none. */
static int owner_arg(pid_t vid, pid_t *sid) {
  if (vid == 0) {
    *sid = 0;
    return 0;
  }
  if (vid == INT32_MIN) return ESRCH;
  pid_t s;
  if (!v2s_pid(vid < 0 ? -vid : vid, &s)) return ESRCH;
  *sid = vid < 0 ? -s : s;
  return 0;
}

/* The kernel's owner (a system PID, -pgid for a group; 0 none) made
 * virtual: 0 for one outside the application. */
static pid_t owner_answer(pid_t sid) {
  if (sid > 0) return s2v_or0(APPSHOT_PID, sid);
  if (sid < 0 && sid != INT32_MIN) return -s2v_or0(APPSHOT_PID, -sid);
  return sid;
}

/* glibc's fcntl64 (a cancellation point for F_SETLKW, and its F_GETOWN
 * tells a group from an error), or the bare call for syscall(). */
static long fcntl_call(int raw, int fd, int cmd, void *arg) {
  int (*real)(int, int, ...) = (int (*)(int, int, ...))real_fn[R_fcntl64];
  if (raw || !real) return libc_ret(SYS3(fcntl, fd, cmd, arg));
  return real(fd, cmd, arg);
}

/* The descriptors (below DNOTIFY_TRACKED) this process made a dnotify
 * watch through, and their copies: closing any of them ends the watch
 * (the kernel flushes a description's watch at every close by the table
 * that made it), so the note goes with it, and a directory opened again
 * later is not taken for watched. Whose marks they are, by virtual PID:
 * a forked child's close does not end its parent's watch, and the marks
 * come back with the memory after a restore, the PID with them. */
#define DNOTIFY_TRACKED 1024
static uint64_t dnotify_fds[DNOTIFY_TRACKED / 64];
static pid_t dnotify_marker;

int dnotify_marked(int fd) {
  return fd >= 0 && fd < DNOTIFY_TRACKED &&
         (__atomic_load_n(&dnotify_fds[fd / 64], __ATOMIC_RELAXED) >> (fd % 64) & 1);
}

static void dnotify_mark(int fd, int on) {
  if (fd < 0 || fd >= DNOTIFY_TRACKED) return;
  if (on && dnotify_marker != self_vpid()) {
    /* Marks inherited across fork: the parent's watches, not ours. */
    for (unsigned i = 0; i < DNOTIFY_TRACKED / 64; i++)
      __atomic_store_n(&dnotify_fds[i], 0, __ATOMIC_RELAXED);
    dnotify_marker = self_vpid();
  }
  uint64_t bit = (uint64_t)1 << (fd % 64);
  if (on) __atomic_or_fetch(&dnotify_fds[fd / 64], bit, __ATOMIC_RELAXED);
  else __atomic_and_fetch(&dnotify_fds[fd / 64], ~bit, __ATOMIC_RELAXED);
}

void dnotify_copy(int from, int to) {
  if (dnotify_marked(from)) dnotify_mark(to, 1);
  else if (dnotify_marked(to)) dnotify_mark(to, 0);
}

/* Before `fd` is closed (or replaced by dup2): a watch made through it in
 * this process ends, and its note goes. */
void dnotify_closing(int fd) {
  if (LIKELY(!dnotify_marked(fd))) return;
  dnotify_mark(fd, 0);
  struct stat st;
  if (dnotify_marker == self_vpid() && g_h && SYS2(fstat, fd, &st) == 0)
    appshot_unnote_socket(g_h, (uint64_t)st.st_ino, APPSHOT_NOTE_DNOTIFY, F_NOTIFY, 0, 0);
}

void dnotify_closing_range(unsigned int first, unsigned int last) {
  for (unsigned int fd = first; fd <= last && fd < DNOTIFY_TRACKED; fd++) dnotify_closing((int)fd);
}

/* This process's note of a dnotify watch of directory `ino`, its mask; 0
 * when there is none. */
static int32_t dnotify_noted_mask(uint64_t ino) {
  for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
    const struct appshot_socket_note *e = &g_h->sockets.note[i];
    if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) == ino &&
        __atomic_load_n(&e->ready, __ATOMIC_ACQUIRE) &&
        e->level == APPSHOT_NOTE_DNOTIFY && e->name == F_NOTIFY)
      return e->value;
  }
  return 0;
}

/* Before an exec: the kernel closes the descriptors with FD_CLOEXEC once
 * the exec cannot fail any more, which ends a watch made through one of
 * them, so their notes go now, and `x` keeps them. The new program can
 * not drop them itself (the descriptors, and our marks, are gone by the
 * time it runs), and a note left would be restored as a watch that no
 * longer exists (on the default SIGIO, its first event kills). Dropped
 * before rather than after: a snapshot between the two sees the
 * descriptor still open without its note, which is exact if the exec then
 * goes through (the copy execs too, and closes it); if it fails,
 * dnotify_exec_failed watches again. */
void dnotify_exec_closing(struct dnotify_exec *x) {
  x->n = 0;
  if (!g_h || dnotify_marker != self_vpid()) return; /* marks not ours */
  uint64_t any = 0;
  for (unsigned i = 0; i < DNOTIFY_TRACKED / 64; i++)
    any |= __atomic_load_n(&dnotify_fds[i], __ATOMIC_RELAXED);
  if (LIKELY(!any)) return;
  for (int fd = 0; fd < DNOTIFY_TRACKED; fd++) {
    struct stat st;
    if (!dnotify_marked(fd)) continue;
    long fl = SYS2(fcntl, fd, F_GETFD);
    if (fl < 0 || !(fl & FD_CLOEXEC) || SYS2(fstat, fd, &st) != 0) continue;
    int32_t mask = dnotify_noted_mask((uint64_t)st.st_ino);
    if (!mask) continue; /* a copy of one dropped already */
    if (x->n < DNOTIFY_EXEC_MAX) {
      x->w[x->n].fd = fd;
      x->w[x->n].ino = (uint64_t)st.st_ino;
      x->w[x->n].mask = mask;
      x->n++;
    }
    appshot_unnote_socket(g_h, (uint64_t)st.st_ino, APPSHOT_NOTE_DNOTIFY, F_NOTIFY, 0, 0);
  }
}

/* The exec failed: the descriptors are still open, and so are their
 * watches (unless a snapshot was taken between the drop and here: its
 * copy has the descriptor without the watch). F_NOTIFY again with the
 * mask noted makes both true (the kernel ORs it into a watch that is
 * there), keeping the owner, which F_NOTIFY sets to its caller; then the
 * note again. Only on this failure path. */
void dnotify_exec_failed(const struct dnotify_exec *x) {
  int saved = errno;
  for (int i = 0; i < x->n; i++) {
    struct f_owner_ex owner;
    struct stat st;
    int fd = x->w[i].fd;
    if (SYS2(fstat, fd, &st) != 0 || (uint64_t)st.st_ino != x->w[i].ino) continue;
    long got = SYS3(fcntl, fd, F_GETOWN_EX, &owner);
    if (SYS3(fcntl, fd, F_NOTIFY, (long)(uint32_t)x->w[i].mask) != 0) continue;
    if (got == 0) SYS3(fcntl, fd, F_SETOWN_EX, &owner);
    appshot_note_dnotify(g_h, x->w[i].ino, x->w[i].mask | dnotify_noted_mask(x->w[i].ino),
                         self_vpid());
  }
  errno = saved;
}

/* At start, in a program this process exec'd: a watched descriptor
 * without FD_CLOEXEC came through the exec, its watch with it (the
 * descriptor table is the same), but not our marks of it, so its close
 * would not drop the note. Marked again: the descriptors of directories
 * noted as watched by this process. Only when some note is ours: no
 * system call otherwise. */
void dnotify_after_exec(void) {
  pid_t me = self_vpid();
  int ours = 0;
  for (int i = 0; i < APPSHOT_SOCKET_NOTES && !ours; i++) {
    const struct appshot_socket_note *e = &g_h->sockets.note[i];
    ours = __atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) &&
           __atomic_load_n(&e->ready, __ATOMIC_ACQUIRE) &&
           e->level == APPSHOT_NOTE_DNOTIFY && e->maker == me;
  }
  if (LIKELY(!ours)) return;
  long dir = SYS4(openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
  if (dir < 0) return;
  char buf[2048] __attribute__((aligned(8)));
  long n;
  while ((n = SYS3(getdents64, dir, buf, sizeof buf)) > 0) {
    for (long off = 0; off < n;) {
      const struct {
        uint64_t ino;
        int64_t off;
        unsigned short reclen;
        unsigned char type;
        char name[];
      } *d = (const void *)(buf + off);
      off += d->reclen;
      int fd = 0, digits = 0;
      for (const char *c = d->name; *c >= '0' && *c <= '9' && fd < DNOTIFY_TRACKED; c++, digits++)
        fd = fd * 10 + (*c - '0');
      if (!digits || d->name[digits] || fd >= DNOTIFY_TRACKED || fd == dir) continue;
      struct stat st;
      if (SYS2(fstat, fd, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
      for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
        const struct appshot_socket_note *e = &g_h->sockets.note[i];
        if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) == (uint64_t)st.st_ino &&
            __atomic_load_n(&e->ready, __ATOMIC_ACQUIRE) &&
            e->level == APPSHOT_NOTE_DNOTIFY && e->maker == me) {
          dnotify_mark(fd, 1);
          break;
        }
      }
    }
  }
  SYS1(close, dir);
}

/* F_SETOWN/F_GETOWN(_EX) name the process or group that gets SIGIO and
 * SIGURG; F_GETLK reports the holder of a conflicting lock; F_DUPFD's copy
 * is tracked as its original is; F_NOTIFY is noted. Every other
 * command passes as it is. */
long do_fcntl(int raw, int fd, int cmd, void *arg) {
  switch (cmd) {
    case F_SETOWN: {
      ID_WINDOW();
      pid_t sid;
      if (owner_arg((pid_t)(long)arg, &sid)) return fail(ESRCH);
      return fcntl_call(raw, fd, cmd, (void *)(long)sid);
    }
    case F_GETOWN: {
      ID_WINDOW();
      long r = fcntl_call(raw, fd, cmd, arg);
      return r == -1 ? r : owner_answer((pid_t)r);
    }
    case F_SETOWN_EX: {
      ID_WINDOW();
      struct f_owner_ex *o = arg, sys_owner;
      if (!o) break; /* EFAULT, the kernel's to say */
      sys_owner = *o;
      if (o->pid > 0 && !v2s_pid(o->pid, &sys_owner.pid)) return fail(ESRCH);
      return fcntl_call(raw, fd, cmd, &sys_owner);
    }
    case F_GETOWN_EX: {
      ID_WINDOW();
      struct f_owner_ex *o = arg;
      long r = fcntl_call(raw, fd, cmd, arg);
      if (r == 0 && o && o->pid > 0) o->pid = s2v_or0(APPSHOT_PID, o->pid);
      return r;
    }
    case F_DUPFD:
    case F_DUPFD_CLOEXEC: { /* the copy carries the marks (fd_marks_copy) */
      long r = fcntl_call(raw, fd, cmd, arg);
      if (r >= 0) fd_marks_copy(fd, (int)r);
      return r;
    }
    case F_NOTIFY: {
      /* A dnotify watch shows nowhere (not in fdinfo; with the default
       * SIGIO not even as a signal): noted by the directory's inode, with
       * its mask, for a snapshot to carry (fdowner.ts). The kernel ORs a
       * mask into the watch of the same description, so the note does
       * too. A watch dropped (no event bit: DN_MULTISHOT alone drops it
       * as 0 does), or ended by a close of its descriptor
       * (dnotify_closing), drops its note; a one-shot one that fired
       * leaves it: a snapshot refuses one-shot watches. */
      long r = fcntl_call(raw, fd, cmd, arg);
      struct stat st;
      if (r == 0 && g_h && SYS2(fstat, fd, &st) == 0) {
        uint32_t mask = (uint32_t)(unsigned long)arg;
        if (mask & ~(uint32_t)DN_MULTISHOT) {
          mask |= (uint32_t)dnotify_noted_mask((uint64_t)st.st_ino);
          /* By its maker: a program this process execs finds the watched
           * descriptors it inherits by it (dnotify_after_exec). */
          appshot_note_dnotify(g_h, (uint64_t)st.st_ino, (int32_t)mask, self_vpid());
          dnotify_mark(fd, 1);
        } else {
          appshot_unnote_socket(g_h, (uint64_t)st.st_ino, APPSHOT_NOTE_DNOTIFY,
                                F_NOTIFY, 0, 0);
          dnotify_mark(fd, 0);
        }
      }
      return r;
    }
    case F_GETLK: /* F_GETLK64 is the same command on x86-64 */
    case F_OFD_GETLK: {
      ID_WINDOW();
      struct flock *lk = arg;
      long r = fcntl_call(raw, fd, cmd, arg);
      /* An OFD lock has no holder PID (the kernel says -1); a classic lock
       * found by either query has its process's. */
      if (r == 0 && lk && lk->l_type != F_UNLCK && lk->l_pid > 0)
        lk->l_pid = s2v_or0(APPSHOT_PID, lk->l_pid);
      return r;
    }
  }
  return fcntl_call(raw, fd, cmd, arg);
}

static int fcntl_va(int fd, int cmd, va_list ap) {
  void *arg = va_arg(ap, void *);
  ensure_init();
  if (LIKELY(!g_h)) return (int)fcntl_call(0, fd, cmd, arg);
  return (int)do_fcntl(0, fd, cmd, arg);
}

API int fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  int r = fcntl_va(fd, cmd, ap);
  va_end(ap);
  return r;
}

/* What programs built with 64-bit offsets call (glibc 2.28 and later). */
API int fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  int r = fcntl_va(fd, cmd, ap);
  va_end(ap);
  return r;
}

/* --- ioctl: a terminal's process group and session, a socket's owner ------
 *
 * TIOCGPGRP, TIOCSPGRP and TIOCGSID are what tcgetpgrp, tcsetpgrp and
 * tcgetsid make (wrapped above), which programs also make by hand (shells,
 * job control in terminal libraries); FIOSETOWN and SIOCSPGRP set a
 * socket's owner as F_SETOWN does (a PID, or a group as -pgid), FIOGETOWN
 * and SIOCGPGRP read it; PIDFD_GET_INFO answers a pidfd's process, its
 * thread group and its parent. Each passes its ids through memory: a
 * virtual one given is read and a system copy handed on (the caller's
 * stays as it was), the kernel's answer made virtual where it wrote it.
 * A NULL argument is handed on for the kernel to refuse (EFAULT). Every
 * other request goes on after a few compares, no system call.
 *
 * PIDFD_GET_INFO (Linux 6.13; our headers may lack it): a pidfd's
 * process, its thread group and parent, at these offsets of the kernel's
 * struct pidfd_info, which has grown since (its size is in the request:
 * any of at least the first version's is this request). */
#define PIDFS_IOCTL_TYPE 0xFF
#define PIDFD_GET_INFO_NR 11
#define PIDFD_INFO_VER0_SIZE 64
#define PIDFD_INFO_PID_BIT 1ull
#define PIDFS_MAGIC 0x50494446 /* statfs's f_type of a pidfd (pidfs) */
struct pidfd_info_ids {
  uint64_t mask;
  uint64_t cgroupid;
  uint32_t pid, tgid, ppid;
};
static int pidfd_get_info_req(unsigned int cmd) {
  return _IOC_TYPE(cmd) == PIDFS_IOCTL_TYPE && _IOC_NR(cmd) == PIDFD_GET_INFO_NR &&
         _IOC_DIR(cmd) == (_IOC_READ | _IOC_WRITE) && _IOC_SIZE(cmd) >= PIDFD_INFO_VER0_SIZE;
}

/* The kernel takes the request as an unsigned int (the upper half of a
 * long one is dropped: syscall(SYS_ioctl, s, FIOGETOWN | 1L << 32, &v)
 * is FIOGETOWN), and so is it compared here. */
static int pid_ioctl(unsigned long req) {
  unsigned int cmd = (unsigned int)req;
  switch (cmd) {
    case TIOCGPGRP:
    case TIOCSPGRP:
    case TIOCGSID:
    case FIOSETOWN:
    case SIOCSPGRP:
    case FIOGETOWN:
    case SIOCGPGRP: return 1;
  }
  return UNLIKELY(pidfd_get_info_req(cmd));
}

/* A setter refused here (its id not the application's, or not readable)
 * fails as the kernel would have failed it first: on a descriptor that is
 * not one the request is for (not a terminal, not the caller's
 * controlling one, not a socket: ENOTTY; a closed one: EBADF), which
 * the kernel checks before it reads the id. The matching getter on the
 * same descriptor gives those errors, and only those: one system call,
 * on the refusal only. Otherwise `err`. */
static long refuse_set(int fd, unsigned int cmd, int err) {
  unsigned int get = cmd == TIOCSPGRP ? TIOCGPGRP : cmd == FIOSETOWN ? FIOGETOWN : SIOCGPGRP;
  pid_t ignored;
  long r = SYS3(ioctl, fd, get, &ignored);
  return fail(r < 0 ? (int)-r : err);
}

/* The id a setter is given at arg, read as the kernel reads it: 0, or the
 * errno to fail with (EFAULT). Where the copy is refused (seccomp), a
 * plain read, as before there was a copy. */
static int read_id_arg(const pid_t *arg, pid_t *id) {
  long r = copy_in(id, arg, sizeof *id);
  if (r == -EFAULT) return EFAULT;
  if (r < 0) *id = *arg;
  return 0;
}

/* glibc's ioctl, or the bare call for syscall() (and before init). */
static long ioctl_call(int raw, int fd, unsigned long req, void *arg) {
  int (*real)(int, unsigned long, ...) = (int (*)(int, unsigned long, ...))real_fn[R_ioctl];
  if (raw || !real) return libc_ret(SYS3(ioctl, fd, req, arg));
  return real(fd, req, arg);
}

long do_ioctl(int raw, int fd, unsigned long req, void *arg) {
  if (!g_h || !pid_ioctl(req) || !arg) return ioctl_call(raw, fd, req, arg);
  ID_WINDOW();
  unsigned int cmd = (unsigned int)req;
  pid_t *id = arg, given, sid;
  int err;
  switch (cmd) {
    case TIOCSPGRP: /* as tcsetpgrp: a group the tables do not know is EPERM */
      /* An id the kernel cannot read: its EFAULT, after the checks it
       * makes first (a background caller's SIGTTOU). */
      if (read_id_arg(id, &given)) return ioctl_call(raw, fd, req, arg);
      if (proc_arg(given, &sid, EPERM)) return unknown_group_set(raw, fd, req);
      return ioctl_call(raw, fd, req, &sid);
    case FIOSETOWN:
    case SIOCSPGRP: /* as F_SETOWN */
      if ((err = read_id_arg(id, &given)) || (err = owner_arg(given, &sid))) return refuse_set(fd, cmd, err);
      return ioctl_call(raw, fd, req, &sid);
  }
  /* An answer: in place, once the kernel wrote it (a bad address is its
   * EFAULT, not our fault). */
  long r = ioctl_call(raw, fd, req, arg);
  if (r != 0) return r;
  if (pidfd_get_info_req(cmd)) {
    /* Only a pidfd's: another driver may number a request of its own so
     * (one system call, on this rare request only). */
    struct statfs sf;
    struct pidfd_info_ids *info = arg;
    if (SYS2(fstatfs, fd, &sf) == 0 && sf.f_type == PIDFS_MAGIC && (info->mask & PIDFD_INFO_PID_BIT)) {
      info->pid = (uint32_t)s2v_or0(APPSHOT_PID, (int32_t)info->pid);
      info->tgid = (uint32_t)s2v_or0(APPSHOT_PID, (int32_t)info->tgid);
      info->ppid = (uint32_t)s2v_or0(APPSHOT_PID, (int32_t)info->ppid);
      /* A process outside the application (no virtual id): ESRCH, as a
       * PID namespace answers for one outside it, not a success naming
       * process 0. Its system ids are not left in the answer. (A parent
       * outside is 0, as in a namespace.) */
      if (!info->pid || !info->tgid) {
        info->pid = info->tgid = info->ppid = 0;
        return fail(ESRCH);
      }
    }
    return r;
  }
  *id = cmd == TIOCGPGRP || cmd == TIOCGSID ? s2v_or0(APPSHOT_PID, *id) : owner_answer(*id);
  return r;
}

API int ioctl(int fd, unsigned long req, ...) {
  va_list ap;
  va_start(ap, req);
  void *arg = va_arg(ap, void *);
  va_end(ap);
  ensure_init();
  if (LIKELY(!pid_ioctl(req))) return (int)ioctl_call(0, fd, req, arg);
  return (int)do_ioctl(0, fd, req, arg);
}
