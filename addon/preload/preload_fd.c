/*
 * The table file's descriptor.
 *
 * The table file is mode 0600, owned by the user who ran appshot, and must
 * stay so: another user must not read or rewrite an application's ids. But
 * servers change user and exec (runuser -u postgres -- postgres, setpriv,
 * nginx and memcached dropping to nobody): the new program could not open
 * the file by its path, would run untranslated, and its children would
 * never be registered. So each process keeps a descriptor of the file,
 * open across exec (not close-on-exec) at a high number, and every exec
 * names it in APPSHOT_TABLES_FD. A descriptor is a capability: holding it
 * is what gives access, whatever the uid, and only the application's own
 * processes hold it.
 *
 * The program must not lose it by accident: close() of it, close_range()
 * and closefrom() over it, and dup2()/dup3() onto it (ours moves first),
 * libc or syscall(), all leave it open, and so do the same as posix_spawn
 * file actions (addclose, adddup2; not addclosefrom_np, whose range glibc
 * closes in the child). A descriptor that the program can no longer see as
 * taken is what a thread's open descriptor looks like to another thread:
 * the number is not handed out, nothing else changes.
 */
#include "preload.h"

int g_tables_fd = -1;

/* Our tables through `fd`, if it holds this application's table file. */
static struct appshot_header *map_ours(int fd, const char *aid) {
  struct appshot_header *h = appshot_table_map_fd(fd);
  /* A table file of another application (stale variables, a reused path
   * or number) would hand us someone else's ids: stay out of it. */
  if (h && strncmp(h->aid, aid, sizeof h->aid) != 0) {
    appshot_table_close(h);
    return NULL;
  }
  return h;
}

/* APPSHOT_TABLES_FD's number, or -1 if it is not a plain decimal. */
static int parse_fd(const char *s) {
  if (!s || !*s) return -1;
  long n = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9' || n > INT_MAX / 10) return -1;
    n = n * 10 + (*s - '0');
  }
  return n <= INT_MAX ? (int)n : -1;
}

/* Whether descriptor `fd` is the very file `path` names (same device and
 * inode, same owner): a number in APPSHOT_TABLES_FD that holds another
 * file of the right size and contents (a copy someone made, a file the
 * program put at that number) is not our table file. Raw system calls: the
 * path is not to be rewritten (REDIR PATH) here. */
static int same_file(int fd, const char *path) {
  struct stat a, b;
  if (!path || !*path) return 0;
  if (SYS2(fstat, fd, &a) != 0 || SYS4(newfstatat, AT_FDCWD, path, &b, 0) != 0)
    return 0;
  return S_ISREG(a.st_mode) && a.st_dev == b.st_dev && a.st_ino == b.st_ino &&
         a.st_uid == b.st_uid;
}

struct appshot_header *tables_attach(const char *aid, const char *fd_var,
                                     const char *path, int *fd) {
  *fd = -1;
  int inherited = parse_fd(fd_var);
  if (inherited >= 0 && SYS3(fcntl, inherited, F_GETFD, 0) >= 0 &&
      same_file(inherited, path)) {
    struct appshot_header *h = map_ours(inherited, aid);
    if (h) {
      *fd = inherited;
      return h;
    }
  }
  /* The path: processes started with `appshot exec`, and those whose
   * parent had no descriptor to give. */
  if (!path || !*path) return NULL;
  long opened = SYS4(openat, AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0);
  if (opened < 0) return NULL;
  struct appshot_header *h = map_ours((int)opened, aid);
  if (h) {
    /* F_DUPFD leaves close-on-exec off on the copy. Without a free number
     * up there the tables work by path only. */
    long high = SYS3(fcntl, opened, F_DUPFD, appshot_tables_fd_base());
    *fd = high >= 0 ? (int)high : -1;
  }
  SYS1(close, opened);
  return h;
}

void tables_fd_keep_across_exec(void) {
  int t = __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED);
  if (t >= 0) SYS3(fcntl, t, F_SETFD, 0);
}

static inline int is_tables_fd(long fd) {
  int t = __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED);
  return t >= 0 && fd == t;
}

/* Whether descriptors a and b are one file (device and inode). */
static int same_inode(int a, int b) {
  struct stat sa, sb;
  return SYS2(fstat, a, &sa) == 0 && SYS2(fstat, b, &sb) == 0 &&
         sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* The program is about to take number `t`, ours (dup2 onto it): ours moves
 * to another free high number first. Returns the new number, or -1 if this
 * call did not move it: another thread moved it first (then the copy made
 * here, which may be of the program's file by now, is dropped), or no
 * number was free (the program wins: the tables then reach its new
 * programs by path only). Async-signal-safe: no lock, no allocation; of two
 * threads moving at once, one compare-and-swap wins. */
static int tables_fd_move(int t) {
  long moved = SYS3(fcntl, t, F_DUPFD, (long)t + 1);
  if (moved < 0) moved = SYS3(fcntl, t, F_DUPFD, appshot_tables_fd_base());
  int expected = t;
  if (moved < 0) {
    __atomic_compare_exchange_n(&g_tables_fd, &expected, -1, 0,
                                __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    return -1;
  }
  if (!__atomic_compare_exchange_n(&g_tables_fd, &expected, (int)moved, 0,
                                   __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
    SYS1(close, moved);
    return -1;
  }
  /* The old number stays open until the program's dup2 replaces it: the
   * replacement is atomic, no one else can take the number meanwhile.
   * tables_fd_moved says what becomes of it if there is no dup2. */
  return (int)moved;
}

/* After the program's dup2 onto `t`, whose copy moved to `moved`. If the
 * dup2 failed, `t` still holds our file: ours goes back there and the copy
 * is closed (one descriptor, as before). If there is to be no dup2 in this
 * process (a posix_spawn file action runs in the child), the old number
 * is closed: left open it would be a second, untracked descriptor of the
 * tables that every later exec inherits. Either only while `t` still is
 * our file: another thread may have put one of the program's there. */
static void tables_fd_moved(int t, int moved, int keep_old) {
  if (moved < 0 || !same_inode(t, moved)) return;
  if (keep_old) {
    int expected = moved;
    if (__atomic_compare_exchange_n(&g_tables_fd, &expected, t, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      SYS1(close, moved);
  } else {
    SYS1(close, t);
  }
}

long do_close(int fd) {
  if (UNLIKELY(is_tables_fd(fd))) return 0;
  dnotify_closing(fd);
  translated_reads_forget(fd);
  cgroup_procs_forget(fd);
  return libc_ret(SYS1(close, fd));
}

API int close(int fd) {
  ensure_init();
  if (UNLIKELY(is_tables_fd(fd))) return 0;
  dnotify_closing(fd);
  translated_reads_forget(fd);
  cgroup_procs_forget(fd);
  inotify_wd_forget(fd);
  /* Called by dlsym itself, while init resolves REAL(close)? */
  if (UNLIKELY(!real_fn[R_close])) return (int)libc_ret(SYS1(close, fd));
  return REAL(close)(fd); /* a cancellation point: glibc's */
}

/* close_range over our number: the two ranges on either side of it. */
long do_close_range(unsigned int first, unsigned int last, int flags) {
  if (!(flags & CLOSE_RANGE_CLOEXEC)) {
    dnotify_closing_range(first, last);
    translated_reads_forget_range(first, last);
    cgroup_procs_forget_range(first, last);
    inotify_wd_forget_range(first, last);
  }
  int t = __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED);
  if (LIKELY(t < 0 || (unsigned int)t < first || (unsigned int)t > last))
    return libc_ret(SYS3(close_range, first, last, flags));
  long r = 0;
  if ((unsigned int)t > first)
    r = libc_ret(SYS3(close_range, first, (unsigned int)t - 1, flags));
  if (r == 0 && (unsigned int)t < last)
    r = libc_ret(SYS3(close_range, (unsigned int)t + 1, last, flags));
  return r;
}

API int close_range(unsigned int first, unsigned int last, int flags) {
  ensure_init();
  return (int)do_close_range(first, last, flags);
}

API void closefrom(int lowfd) {
  ensure_init();
  dnotify_closing_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0U);
  translated_reads_forget_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0U);
  cgroup_procs_forget_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0U);
  inotify_wd_forget_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0U);
  int t = __atomic_load_n(&g_tables_fd, __ATOMIC_RELAXED);
  if (LIKELY(t < 0 || t < lowfd)) {
    REAL(closefrom)(lowfd);
    return;
  }
  /* Below ours, as glibc does it when close_range is missing: one by one. */
  if (lowfd < t && SYS3(close_range, lowfd < 0 ? 0 : lowfd, t - 1, 0) != 0)
    for (int fd = lowfd < 0 ? 0 : lowfd; fd < t; fd++) SYS1(close, fd);
  REAL(closefrom)(t + 1);
}

/* A copy of a descriptor is the same file: it carries the original's marks
 * (reads translated: signalfd, message queue; cgroup.procs), and loses
 * whatever its number had. A shell's
 * `echo $pid > cgroup.procs` opens the file and writes through the copy
 * that dup2 made of it on 1. */
void fd_marks_copy(int from, int to) {
  int sfd = translated_reads_marked(from), procs = cgroup_procs_marked(from);
  translated_reads_mark(to, sfd);
  cgroup_procs_mark(to, procs);
  dnotify_copy(from, to);
  inotify_wd_copy(from, to);
}

long do_dup3(long nr, int oldfd, int newfd, int flags) {
  int moved = -1;
  if (UNLIKELY(is_tables_fd(newfd)) && oldfd != newfd) moved = tables_fd_move(newfd);
  /* dup2 onto a descriptor closes it first (when oldfd is open). */
  if (UNLIKELY(dnotify_marked(newfd)) && oldfd != newfd && SYS2(fcntl, oldfd, F_GETFD) >= 0)
    dnotify_closing(newfd);
  long r = nr == SYS_dup2 ? SYS2(dup2, oldfd, newfd)
                          : SYS3(dup3, oldfd, newfd, flags);
  if (UNLIKELY(moved >= 0) && r < 0) tables_fd_moved(newfd, moved, 1);
  if (r >= 0) fd_marks_copy(oldfd, newfd);
  return libc_ret(r);
}

/* The same as through syscall(): glibc's dup2 and dup3 are bare system
 * calls (dup2's check of oldfd == newfd is the kernel's too). */
API int dup2(int oldfd, int newfd) {
  ensure_init();
  return (int)do_dup3(SYS_dup2, oldfd, newfd, 0);
}

API int dup3(int oldfd, int newfd, int flags) {
  ensure_init();
  return (int)do_dup3(SYS_dup3, oldfd, newfd, flags);
}

API int dup(int fd) {
  ensure_init();
  long r = SYS1(dup, fd);
  if (r >= 0) fd_marks_copy(fd, (int)r);
  return (int)libc_ret(r);
}

/* posix_spawn's file actions run in the child, inside glibc: decided here,
 * when they are recorded. */
API int posix_spawn_file_actions_addclose(posix_spawn_file_actions_t *fa,
                                          int fd) {
  ensure_init();
  if (UNLIKELY(is_tables_fd(fd))) return 0;
  return REAL(posix_spawn_file_actions_addclose)(fa, fd);
}

API int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t *fa,
                                         int fd, int newfd) {
  ensure_init();
  /* Moved in the parent now, so the child inherits ours elsewhere and the
   * spawn names that number (APPSHOT_TABLES_FD). The old number is closed
   * here: the dup2 onto it happens in the child only. */
  if (UNLIKELY(is_tables_fd(newfd)) && fd != newfd) {
    int moved = tables_fd_move(newfd);
    tables_fd_moved(newfd, moved, 0);
  }
  return REAL(posix_spawn_file_actions_adddup2)(fa, fd, newfd);
}
