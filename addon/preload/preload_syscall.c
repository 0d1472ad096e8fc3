/*
 * syscall(): programs that make id system calls through it (gettid before
 * glibc 2.30, tgkill, pidfd_open, sched_setattr, kcmp, ioprio_set, libnuma's
 * move_pages, CPU-time clocks...) and path calls (openat2, which glibc has
 * no function for; open, stat, readlink... of /proc/<pid>; fchmod,
 * fsetxattr... of a descriptor open on a copy-on-write original) get the
 * same translation as through the libc functions; landlock_restrict_self
 * marks the process (below). The kernel's conventions are
 * kept where they differ from libc's (getpriority returns 20 - nice);
 * errors are -1 and errno, as syscall() reports them.
 */
#include "preload.h"

#include <sys/resource.h>
#include <sys/times.h>

#include <stdarg.h>

/* --- Landlock -------------------------------------------------------------
 *
 * A Landlock domain (landlock_restrict_self) belongs to a process's
 * credentials, and the kernel shows it nowhere: no snapshot can read it,
 * and a restored process would come back without it, free to read what it
 * was denied. So the process's table entry is marked APPSHOT_F_LANDLOCK and
 * the snapshot refuses it by name (src/resources/creds.ts). Children
 * inherit the domain and exec keeps it, so the mark follows: the parent
 * marks each child it maps (posix_spawn's and a raw clone's run none of
 * our code before they run the program's), a child made inside our code
 * marks itself (one glibc forked without our wrapper: daemon()), and a new
 * program learns at init whether its process is marked (exec keeps the
 * entry). The domain is the calling thread's only, and its later
 * children's; the mark is the whole process's, and every child made after
 * it is marked, whichever thread made it: never too few. Only calls made
 * through syscall() are seen: a raw system call (a static binary, Go)
 * is not. */

/* Whether this process was marked: its memory's word, which a fork child
 * copies and a new program sets again at init (landlock_at_start). */
static int g_landlocked;

static void landlock_mark(int32_t spid) {
  appshot_set_flags(g_h, APPSHOT_PID, spid, APPSHOT_F_LANDLOCK);
}

void landlock_note_child(int32_t child) {
  if (UNLIKELY(__atomic_load_n(&g_landlocked, __ATOMIC_RELAXED)) && child > 0) landlock_mark(child);
}

void landlock_fork_child(void) {
  if (LIKELY(!__atomic_load_n(&g_landlocked, __ATOMIC_RELAXED)) || !g_h) return;
  /* Our parent may not have mapped us yet (or ever: glibc forked): an
   * entry is made here if there is none, for the mark to land on. */
  int32_t spid = (int32_t)SYS0(getpid);
  if (appshot_map_system(g_h, APPSHOT_PID, spid, 0, 0) >= 0) landlock_mark(spid);
}

void landlock_at_start(int32_t spid) {
  uint32_t flags;
  if (appshot_s2flags(g_h, APPSHOT_PID, spid, &flags) && (flags & APPSHOT_F_LANDLOCK)) {
    __atomic_store_n(&g_landlocked, 1, __ATOMIC_RELAXED);
    return;
  }
  /* posix_spawn's child runs this before its parent, back from the
   * spawn, has marked it: its parent's mark says. (Also that of a child
   * made before its parent restricted itself, which then execs: a
   * refusal too many, never one too few.) */
  int32_t parent = (int32_t)SYS0(getppid);
  if (parent > 1 && appshot_s2flags(g_h, APPSHOT_PID, parent, &flags) && (flags & APPSHOT_F_LANDLOCK)) {
    __atomic_store_n(&g_landlocked, 1, __ATOMIC_RELAXED);
    landlock_mark(spid);
  }
}

/* landlock_restrict_self(ruleset, flags), which glibc has no function for.
 * A translation window (preload.h): a snapshot that stops the thread
 * between the restriction and the mark lets it run on until the mark is
 * there. A ruleset of -1 restricts nothing (it only sets how the current
 * domain is logged, Linux 6.15): no mark. */
static long do_landlock_restrict_self(long ruleset, long flags) {
  ID_WINDOW();
  long r = appshot_raw_syscall(SYS_landlock_restrict_self, ruleset, flags, 0, 0, 0, 0);
  if (r == 0 && (int)ruleset != -1) {
    __atomic_store_n(&g_landlocked, 1, __ATOMIC_RELAXED);
    landlock_mark((int32_t)SYS0(getpid));
  }
  return libc_ret(r);
}

/* Set for good once the program called mbind (libnuma's mbind is
 * syscall(SYS_mbind); glibc has none): a snapshot asks each mapping's own
 * NUMA policy only then (src/resources/memory.ts), a question per mapping
 * that costs a program with a thousand of them ~10 ms of its frozen window.
 * Inherited by a fork (its mappings keep their policies), 0 again after an
 * exec (they are gone with the old program's memory). */
static uint32_t g_mbind_used;
extern uint32_t appshot_mbind_used __attribute__((alias("g_mbind_used"), visibility("default")));

API long syscall(long nr, ...) {
  va_list ap;
  va_start(ap, nr);
  long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long);
  long d = va_arg(ap, long), e = va_arg(ap, long), f = va_arg(ap, long);
  va_end(ap);
  ensure_init();
  /* The table file's descriptor is kept whether or not we translate. */
  switch (nr) {
    case SYS_close: return do_close((int)a);
    case SYS_close_range:
      return do_close_range((unsigned int)a, (unsigned int)b, (int)c);
    case SYS_dup2:
    case SYS_dup3: return do_dup3(nr, (int)a, (int)b, (int)c);
  }
  if (!g_h) {
    /* A child on a stack of its own returns on it as from glibc's
     * syscall(), not through our frame, which it does not have there. */
    if (nr == SYS_clone && b) return libc_ret(raw_clone_on_stack(a, b, c, d, e, NULL));
    if (nr == SYS_clone3) return libc_ret(raw_clone3_on_stack(a, b, NULL));
    return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, f));
  }
  switch (nr) {
    case SYS_getpid: return self_vpid();
    case SYS_gettid: return self_vtid();
    case SYS_getppid: return do_getppid();
    case SYS_kill: return do_kill((pid_t)a, (int)b);
    case SYS_tkill: return do_tgkill(nr, 0, (pid_t)a, (int)b);
    case SYS_tgkill: return do_tgkill(nr, (pid_t)a, (pid_t)b, (int)c);
    case SYS_rt_sigqueueinfo:
      return do_sigqueueinfo(nr, (pid_t)a, 0, (int)b, (siginfo_t *)c);
    case SYS_rt_tgsigqueueinfo:
      return do_sigqueueinfo(nr, (pid_t)a, (pid_t)b, (int)c, (siginfo_t *)d);
    case SYS_wait4:
      return do_wait4((pid_t)a, (int *)b, (int)c, (struct rusage *)d);
    case SYS_waitid:
      return do_waitid((idtype_t)a, (id_t)b, (siginfo_t *)c, (int)d,
                       (struct rusage *)e);
    case SYS_getpgid: return do_getpgid((pid_t)a);
    case SYS_getpgrp: return do_getpgid(0);
    case SYS_getsid: return do_getsid((pid_t)a);
    case SYS_setpgid: return do_setpgid((pid_t)a, (pid_t)b);
    case SYS_setsid: return do_setsid();
    case SYS_clone: return do_clone_syscall(a, b, c, d, e);
    case SYS_fork:
    case SYS_vfork: return do_fork_syscall();
    case SYS_clone3: return do_clone3_syscall(a, b);
    case SYS_unshare:
      if (ns_refused((unsigned long)a)) return -1;
      break;
    case SYS_setns: return do_setns((int)a, (int)b);
    case SYS_landlock_restrict_self: return do_landlock_restrict_self(a, b);
    case SYS_getpriority:
    case SYS_setpriority: return do_prio(nr, a, b, c);
    case SYS_pidfd_open:
    case SYS_sched_setaffinity:
    case SYS_sched_getaffinity:
    case SYS_sched_setscheduler:
    case SYS_sched_getscheduler:
    case SYS_sched_setparam:
    case SYS_sched_getparam:
    case SYS_sched_rr_get_interval:
    case SYS_sched_setattr:
    case SYS_sched_getattr:
    case SYS_prlimit64:
    case SYS_process_vm_readv:
    case SYS_process_vm_writev:
    case SYS_get_robust_list:
    case SYS_move_pages:
    case SYS_migrate_pages: return do_pid_first(nr, a, b, c, d, e, f);
    case SYS_capget:
    case SYS_capset:
      return do_capget_set(nr, (struct __user_cap_header_struct *)a,
                           (void *)b);
    case SYS_ptrace: /* the kernel's convention: PEEK* store at `data` */
      return do_ptrace(a, (pid_t)b, (void *)c, (void *)d);
    case SYS_kcmp: return do_kcmp((pid_t)a, (pid_t)b, c, d, e);
    case SYS_ioprio_get:
    case SYS_ioprio_set: return do_ioprio(nr, a, b, c);
    case SYS_perf_event_open:
      return do_perf_event_open(a, (pid_t)b, c, d, (unsigned long)e);
    case SYS_fcntl: return do_fcntl(1, (int)a, (int)b, (void *)c);
    case SYS_prctl: return do_prctl(a, b, c, d, e);
    case SYS_ioctl: return do_ioctl(1, (int)a, (unsigned long)b, (void *)c);
    case SYS_rt_sigaction:
      return do_rt_sigaction((int)a, (const void *)b, (void *)c, (size_t)d);
    case SYS_rt_sigtimedwait:
      return do_rt_sigtimedwait((const sigset_t *)a, (siginfo_t *)b,
                                (const struct timespec *)c, (size_t)d);
    case SYS_set_tid_address: /* returns the caller's TID */
      appshot_raw_syscall(nr, a, 0, 0, 0, 0, 0);
      return self_vtid();
    case SYS_semget: return do_ipc_get(APPSHOT_SEMID, (key_t)a, b, c);
    case SYS_shmget: return do_ipc_get(APPSHOT_SHMID, (key_t)a, b, c);
    case SYS_msgget: return do_ipc_get(APPSHOT_MSGID, (key_t)a, b, 0);
    case SYS_semop:
      return do_semtimedop((int)a, (struct sembuf *)b, (size_t)c, NULL);
    case SYS_semtimedop:
      return do_semtimedop((int)a, (struct sembuf *)b, (size_t)c,
                           (const struct timespec *)d);
    case SYS_semctl: {
      union semun u;
      u.__buf = (struct seminfo *)d; /* the kernel takes it by register */
      return do_semctl((int)a, (int)b, (int)c, u);
    }
    case SYS_shmat: return do_shmat((int)a, (const void *)b, (int)c);
    case SYS_shmctl: return do_shmctl((int)a, (int)b, (struct shmid_ds *)c);
    case SYS_msgsnd:
      return do_msgsnd((int)a, (const void *)b, (size_t)c, (int)d);
    case SYS_msgrcv:
      return do_msgrcv((int)a, (void *)b, (size_t)c, d, (int)e);
    case SYS_msgctl: return do_msgctl((int)a, (int)b, (struct msqid_ds *)c);
    case SYS_clock_gettime:
    case SYS_clock_getres:
    case SYS_clock_settime:
    case SYS_clock_nanosleep:
    case SYS_timer_create: return do_clock_syscall(nr, a, b, c, d);
    /* The CPU time a restore carried (preload_cputime.c): through the
     * wrappers, whose conventions syscall()'s are. */
    case SYS_getrusage: return getrusage((int)a, (struct rusage *)b);
    case SYS_times: return (long)times((struct tms *)a);
    case SYS_setsockopt: return do_setsockopt_syscall(a, b, c, d, e);
    case SYS_open:
    case SYS_openat:
    case SYS_openat2:
    case SYS_stat:
    case SYS_lstat:
    case SYS_newfstatat:
    case SYS_statx:
    case SYS_access:
    case SYS_faccessat:
    case SYS_faccessat2:
    case SYS_readlink:
    case SYS_readlinkat:
    case SYS_chdir:
    case SYS_fchdir:
    case SYS_chmod:
    case SYS_fchmodat:
    case SYS_chown:
    case SYS_lchown:
    case SYS_utime:
    case SYS_utimes:
    case SYS_setxattr:
    case SYS_lsetxattr:
    case SYS_removexattr:
    case SYS_lremovexattr:
    case SYS_getxattr:
    case SYS_lgetxattr:
    case SYS_listxattr:
    case SYS_llistxattr:
    case SYS_mknod:
    case SYS_mknodat:
    case SYS_symlink: return do_path_syscall(nr, a, b, c, d, e);
    /* Metadata calls that may name a descriptor (preload_cowfd.c); the
     * *at ones given a path go on to do_path_syscall. */
    case SYS_fchmod:
    case SYS_fchown:
    case SYS_fsetxattr:
    case SYS_fremovexattr:
    case SYS_fchmodat2:
    case SYS_fchownat:
    case SYS_futimesat:
    case SYS_utimensat:
    case SYS_linkat: return do_cowfd_syscall(nr, a, b, c, d, e);
    case SYS_getdents64:
    case SYS_getdents: return do_getdents_syscall(nr, a, b, c);
    case SYS_getsockopt:
    case SYS_sendmsg:
    case SYS_sendmmsg:
    case SYS_recvmsg:
    case SYS_recvmmsg: return do_creds_syscall(nr, a, b, c, d, e);
    case SYS_mbind: __atomic_store_n(&g_mbind_used, 1, __ATOMIC_RELAXED); break;
  }
  return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, f));
}
