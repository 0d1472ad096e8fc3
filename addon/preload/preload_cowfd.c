/*
 * Metadata calls on a descriptor, under a copy-on-write rule.
 *
 * A clone reads an original where it is until it writes it
 * (preload_path.c): a read-only open of a path that has no private copy
 * is a descriptor on the template's file, which the template and every
 * other clone share. A metadata call made on that descriptor would change
 * the file for all of them. So, as the path calls do, it is made on the
 * clone's private side instead. The calls: fchmod, fchown, futimens,
 * futimes, fsetxattr, fremovexattr; fchownat, fchmodat (where glibc hands
 * it to fchmodat2) and utimensat with AT_EMPTY_PATH and an empty path,
 * futimesat with a NULL path (the descriptor itself, or with AT_FDCWD the
 * working directory); linkat with AT_EMPTY_PATH, whose new name would
 * otherwise be a second name of the original's inode, which a write
 * through it would change; and each of them through syscall().
 * ftruncate needs a descriptor open for writing, and a write open of an
 * original copies it up first: it never reaches an original that way
 * (but see "relative paths" in preload_path.c).
 *
 *  - Which descriptors: one whose name (readlink of /proc/self/fd/N, or of
 *    /proc/self/cwd) is under a rule's `from`, not its private side, and
 *    whose inode is the one under that name now (a file renamed or
 *    replaced since is left to the kernel: a copy would be of another
 *    file). Where the instance has no copy-on-write rule, nothing is
 *    looked at: the call goes to the kernel after a few loads.
 *  - What the kernel refuses before it looks at the file is refused
 *    first (flags, nanoseconds; EBADF for an O_PATH descriptor given to
 *    a call that needs an open file), then what it would refuse on the
 *    original: copy_attr_up's checks (EPERM for a chmod, chown or utime
 *    with explicit times of a file the caller does not own...), and the
 *    original's answer for an xattr name (XATTR_CREATE of a name it has,
 *    XATTR_REPLACE or removexattr of one it lacks, a name it refuses).
 *    Nothing is copied then.
 *  - The private side is made as a path call makes it (copy_attr_up), or
 *    used as it is when it exists already.
 *  - A regular file, or any file but a directory open O_PATH, then moves:
 *    the private copy is opened with the descriptor's status flags (less
 *    O_CREAT, O_EXCL, O_TRUNC), the call is made on it (one the kernel
 *    refuses there leaves the descriptor where it was), it is seeked to
 *    the old descriptor's offset and put in its place with dup3,
 *    close-on-exec as it was. The program's descriptor reads the same
 *    contents at the same offset, and its fstat shows the change, as
 *    with a kernel overlay.
 *  - What does not move gets the change on the private side by name, and
 *    its fstat keeps showing the original's: a directory (the private one
 *    lists nothing, since listings are not merged, a position in the
 *    listing being read does not carry over, and an *at() call relative
 *    to it would no longer find the original's entries); a FIFO, socket
 *    or device open for I/O (what is open is the original inode's: a
 *    pipe's data, a device's session); a file whose copy cannot be opened
 *    with the descriptor's flags.
 *
 * A move changes this process's descriptor only:
 *  - another descriptor of the same open file (dup, fork, SCM_RIGHTS, a
 *    process sharing the table but for CLONE_FILES) stays on the
 *    original; a metadata call through it is made on the same private
 *    copy and moves that one;
 *  - a memory mapping of the original stays on the original (it keeps
 *    what the template's file holds, which a clone cannot change through
 *    a read-only descriptor anyway);
 *  - locks held through the descriptor stay with the original: dup3
 *    closes the old descriptor, which drops this process's POSIX locks on
 *    the original's inode and, if it was the last reference, the open
 *    file's flock and OFD locks;
 *  - another thread reading through the descriptor while it moves may
 *    read a range twice (the offset is taken before the move).
 *
 * Raw system calls and the caller's stack (one PATH_MAX buffer, on the
 * slow path only), as the path wrappers: these calls are async-signal-safe.
 */
#include "preload.h"

#include <sys/xattr.h>

/* Whether the instance has a copy-on-write rule: only then may a
 * descriptor be open on an original. A few loads while there is none. */
static inline int cow_rules(void) {
  struct appshot_header *h = g_h;
  if (LIKELY(!h)) return 0;
  uint32_t n = h->instance.redirs;
  if (LIKELY(n == 0)) return 0;
  if (n > APPSHOT_REDIRS) n = APPSHOT_REDIRS;
  for (uint32_t i = 0; i < n; i++)
    if (h->instance.redir[i].kind == APPSHOT_REDIR_COW) return 1;
  return 0;
}

/* The path of a call that names the descriptor itself (AT_EMPTY_PATH
 * with an empty path; a NULL one, which the kernel may take as empty). */
static inline int names_fd(const char *path, int flags) {
  return (flags & AT_EMPTY_PATH) && (!path || !*path);
}

/* One call, as the system call that makes it: nr with the descriptor
 * first and the arguments a[] after it. */
struct fd_call {
  long nr; /* SYS_fchmod, fchmodat2, fchown, fchownat, utimensat,
              fsetxattr, fremovexattr or linkat */
  int fd;  /* AT_FDCWD: the working directory (AT_EMPTY_PATH) */
  int needs_open; /* EBADF for an O_PATH descriptor */
  int libc_fchmodat; /* glibc's fchmodat decides its flags */
  int op;  /* copy_attr_up's: PATH_LATTR (the object itself) and refusals */
  long a[4];
};

/* The descriptor is not open on an original: the caller's own call. */
#define NOT_ORIGINAL LONG_MIN

/* The call, made on descriptor fd (the private copy's). */
static long call_on_fd(const struct fd_call *c, int fd) {
  if (c->nr == SYS_linkat) {
    /* linkat's wrapper: the new name under the rules, as any link's. */
    int r = linkat_path(fd, (const char *)c->a[0], (int)c->a[1], (const char *)c->a[2], (int)c->a[3]);
    return r < 0 ? -errno : r;
  }
  return appshot_raw_syscall(c->nr, fd, c->a[0], c->a[1], c->a[2], c->a[3], 0);
}

/* The call, made by name on the private side p (the object itself, not
 * what a symlink there leads to), of type `type`. */
static long call_on_path(const struct fd_call *c, const char *p, mode_t type) {
  switch (c->nr) {
    case SYS_fchmod:
    case SYS_fchmodat2: {
      long mode = c->nr == SYS_fchmod ? c->a[0] : c->a[1];
      long r = appshot_raw_syscall(SYS_fchmodat2, AT_FDCWD, (long)p, mode, AT_SYMLINK_NOFOLLOW, 0, 0);
      if (r != -ENOSYS) return r; /* Linux before 6.6: */
      return S_ISLNK(type) ? -EOPNOTSUPP : SYS3(fchmodat, AT_FDCWD, p, mode);
    }
    case SYS_fchown: return SYS5(fchownat, AT_FDCWD, p, c->a[0], c->a[1], AT_SYMLINK_NOFOLLOW);
    case SYS_fchownat: return SYS5(fchownat, AT_FDCWD, p, c->a[1], c->a[2], AT_SYMLINK_NOFOLLOW);
    case SYS_utimensat: return SYS4(utimensat, AT_FDCWD, p, c->a[1], AT_SYMLINK_NOFOLLOW);
    case SYS_fsetxattr: return SYS5(lsetxattr, p, c->a[0], c->a[1], c->a[2], c->a[3]);
    case SYS_fremovexattr: return SYS2(lremovexattr, p, c->a[0]);
    default: { /* linkat */
      int r = linkat_path(AT_FDCWD, p, (int)c->a[1], (const char *)c->a[2], 0);
      return r < 0 ? -errno : r;
    }
  }
}

/* What the kernel (or glibc) refuses before it looks at the file, asked of
 * it with no descriptor (-1: it answers EBADF once the rest is accepted)
 * where it checks the rest first; 0 when nothing is refused. */
static long refused_early(const struct fd_call *c, int fl) {
  if (c->needs_open && fl >= 0 && (fl & O_PATH)) return -EBADF;
  long r;
  switch (c->nr) {
    case SYS_fchmodat2:
      if (c->libc_fchmodat) {
        r = REAL(fchmodat)(-1, (const char *)c->a[0], (mode_t)c->a[1], (int)c->a[2]) < 0 ? -errno : 0;
      } else {
        r = appshot_raw_syscall(SYS_fchmodat2, -1, c->a[0], c->a[1], c->a[2], 0, 0);
      }
      return r == -EBADF ? 0 : (r ? r : -EBADF);
    case SYS_fchownat:
    case SYS_linkat:
      r = appshot_raw_syscall(c->nr, -1, c->a[0], c->a[1], c->a[2], c->a[3], 0);
      return r == -EBADF ? 0 : (r ? r : -EBADF);
    case SYS_utimensat:
      /* The descriptor itself by a NULL path: no flags. */
      if ((c->op & PATH_EINVAL) || (!c->a[0] && c->a[2])) return -EINVAL;
      return 0;
    case SYS_fsetxattr:
      if (c->a[3] & ~(long)(XATTR_CREATE | XATTR_REPLACE)) return -EINVAL;
      __attribute__((fallthrough)); /* what the original's xattrs decide */
    case SYS_fremovexattr: {
      int set = c->nr == SYS_fsetxattr;
      int flags = set ? (int)c->a[3] : 0;
      r = SYS4(fgetxattr, c->fd, c->a[0], NULL, 0);
      if (set && r >= 0 && (flags & XATTR_CREATE)) return -EEXIST;
      if (r == -ENODATA && set && !(flags & XATTR_REPLACE)) return 0;
      if (r == -ENODATA || r == -EOPNOTSUPP || r == -ERANGE) return r;
      return 0;
    }
  }
  return 0;
}

/* The call, if fd is open on an original under a copy-on-write rule:
 * made on the private side, the descriptor moved there when it can be.
 * Returns the kernel's answer (-errno on failure), or NOT_ORIGINAL. */
static NOINLINE long on_original(const struct fd_call *c) {
  char buf[PATH_MAX];
  char name[32] = "/proc/self/cwd";
  if (c->fd >= 0) *put_decimal((char *)memcpy(name, "/proc/self/fd/", 14) + 14, (unsigned long)c->fd) = '\0';
  else if (c->fd != AT_FDCWD) return NOT_ORIGINAL;
  long n = SYS4(readlinkat, AT_FDCWD, name, buf, PATH_MAX);
  if (n <= 0 || n >= PATH_MAX || buf[0] != '/') return NOT_ORIGINAL; /* a pipe, a socket, no such fd */
  buf[n] = '\0';
  if (!cow_fd_named(buf)) return NOT_ORIGINAL;
  struct stat st;
  if (appshot_raw_syscall(SYS_newfstatat, c->fd, (long)"", (long)&st, AT_EMPTY_PATH, 0, 0) < 0) return NOT_ORIGINAL;
  int fl = c->fd >= 0 ? (int)SYS2(fcntl, c->fd, F_GETFL) : -1;
  long r = refused_early(c, fl);
  if (r < 0) return r;
  const char *priv;
  r = cow_fd_private(buf, c->op, &st, &priv);
  if (r == 1) return NOT_ORIGINAL;
  if (r < 0) return r;

  int moves = fl >= 0 && !S_ISDIR(st.st_mode) && (S_ISREG(st.st_mode) || (fl & O_PATH));
  long nfd = -1;
  struct stat pst, nst;
  if (appshot_raw_syscall(SYS_newfstatat, AT_FDCWD, (long)priv, (long)&pst, AT_SYMLINK_NOFOLLOW, 0, 0) < 0) pst = st;
  if (moves && (pst.st_mode & S_IFMT) == (st.st_mode & S_IFMT)) {
    /* The descriptor's own flags (O_NOFOLLOW only if it had it: F_GETFL
     * shows it); the file opened must be the one looked at, not what a
     * symlink put there since leads to. */
    int of = (fl & O_PATH) ? O_PATH | (fl & O_NOFOLLOW) | O_CLOEXEC
                           : (fl & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC)) | O_NOCTTY | O_CLOEXEC;
    nfd = SYS4(openat, AT_FDCWD, priv, of, 0);
    if (nfd == -EPERM && (of & O_NOATIME)) nfd = SYS4(openat, AT_FDCWD, priv, of & ~O_NOATIME, 0);
    if (nfd >= 0 && (SYS2(fstat, nfd, &nst) < 0 || nst.st_dev != pst.st_dev || nst.st_ino != pst.st_ino)) {
      SYS1(close, nfd); /* changed by name instead */
      nfd = -1;
    }
  }
  if (nfd < 0) return call_on_path(c, priv, pst.st_mode & S_IFMT);
  r = call_on_fd(c, (int)nfd);
  if (r >= 0) {
    if (!(fl & O_PATH)) {
      long off = SYS3(lseek, c->fd, 0, SEEK_CUR);
      if (off > 0) SYS3(lseek, nfd, off, SEEK_SET);
    }
    long fdfl = SYS2(fcntl, c->fd, F_GETFD);
    SYS3(dup3, nfd, c->fd, fdfl > 0 && (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0);
  }
  SYS1(close, nfd);
  return r;
}

/* on_original when the instance has a copy-on-write rule, else (or for a
 * descriptor on anything else) NOT_ORIGINAL. */
static inline long fd_call(const struct fd_call *c) {
  return UNLIKELY(cow_rules()) ? on_original(c) : NOT_ORIGINAL;
}

/* The ops of the path calls, for the object the descriptor is open on
 * (never a symlink's target: PATH_LATTR). */
static inline int lattr(int op) { return (op & ~PATH_OP_MASK) | PATH_LATTR; }
static const int CHMOD_OP = PATH_LATTR | PATH_OWNER | PATH_NOLINK;

API int fchmod(int fd, mode_t mode) {
  ensure_init();
  struct fd_call c = {SYS_fchmod, fd, 1, 0, CHMOD_OP, {mode}};
  long r = fd_call(&c);
  return (int)libc_ret(r != NOT_ORIGINAL ? r : SYS2(fchmod, fd, mode));
}

API int fchmodat(int fd, const char *path, mode_t mode, int flags) {
  ensure_init();
  if (UNLIKELY(names_fd(path, flags))) {
    struct fd_call c = {SYS_fchmodat2, fd, 0, 1, CHMOD_OP, {(long)path, mode, flags}};
    long r = fd_call(&c);
    if (r != NOT_ORIGINAL) return (int)libc_ret(r);
  }
  return fchmodat_path(fd, path, mode, flags);
}

API int fchown(int fd, uid_t uid, gid_t gid) {
  ensure_init();
  struct fd_call c = {SYS_fchown, fd, 1, 0, lattr(path_chown_op(0, uid, gid)), {uid, gid}};
  long r = fd_call(&c);
  return (int)libc_ret(r != NOT_ORIGINAL ? r : SYS3(fchown, fd, uid, gid));
}

API int fchownat(int fd, const char *path, uid_t uid, gid_t gid, int flags) {
  ensure_init();
  if (UNLIKELY(names_fd(path, flags))) {
    struct fd_call c = {SYS_fchownat, fd, 0, 0, lattr(path_chown_op(flags & ~AT_EMPTY_PATH, uid, gid)),
                        {(long)path, uid, gid, flags}};
    long r = fd_call(&c);
    if (r != NOT_ORIGINAL) return (int)libc_ret(r);
  }
  return fchownat_path(fd, path, uid, gid, flags);
}

/* The utime family on a descriptor: utimensat with a NULL path, as glibc
 * makes futimens and futimes (a tv_usec out of range is a tv_nsec out of
 * range: EINVAL). */
static long futimens_call(int fd, const char *path, const struct timespec *ts, int flags) {
  struct fd_call c = {SYS_utimensat, fd, !path, 0, lattr(path_utimens_op(ts, flags)),
                      {(long)path, (long)ts, flags}};
  long r = fd_call(&c);
  return r != NOT_ORIGINAL ? r : SYS4(utimensat, fd, path, ts, flags);
}
static const struct timespec *timeval_times(const struct timeval *tv, struct timespec ts[2]) {
  if (!tv) return NULL;
  ts[0] = (struct timespec){tv[0].tv_sec, tv[0].tv_usec * 1000};
  ts[1] = (struct timespec){tv[1].tv_sec, tv[1].tv_usec * 1000};
  return ts;
}

API int futimens(int fd, const struct timespec times[2]) {
  ensure_init();
  if (fd < 0) return (int)fail(EBADF); /* glibc's check: NULL would be a path */
  return (int)libc_ret(futimens_call(fd, NULL, times, 0));
}

API int futimes(int fd, const struct timeval tv[2]) {
  ensure_init();
  if (fd < 0) return (int)fail(EBADF);
  struct timespec ts[2];
  return (int)libc_ret(futimens_call(fd, NULL, timeval_times(tv, ts), 0));
}

API int utimensat(int fd, const char *path, const struct timespec times[2], int flags) {
  ensure_init();
  /* <sys/stat.h> declares path nonnull: the compiler would drop the test. */
  __asm__("" : "+r"(path));
  if (UNLIKELY(path && names_fd(path, flags) && cow_rules()))
    return (int)libc_ret(futimens_call(fd, path, times, flags));
  return utimensat_path(fd, path, times, flags);
}

/* futimesat's NULL path is the descriptor itself. */
API int futimesat(int fd, const char *path, const struct timeval times[2]) {
  ensure_init();
  if (UNLIKELY(!path && fd != AT_FDCWD && cow_rules())) {
    struct timespec ts[2];
    return (int)libc_ret(futimens_call(fd, NULL, timeval_times(times, ts), 0));
  }
  return futimesat_path(fd, path, times);
}

API int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags) {
  ensure_init();
  struct fd_call c = {SYS_fsetxattr, fd, 1, 0, PATH_LATTR, {(long)name, (long)value, (long)size, flags}};
  long r = fd_call(&c);
  return (int)libc_ret(r != NOT_ORIGINAL ? r : SYS5(fsetxattr, fd, name, value, size, flags));
}

API int fremovexattr(int fd, const char *name) {
  ensure_init();
  struct fd_call c = {SYS_fremovexattr, fd, 1, 0, PATH_LATTR, {(long)name}};
  long r = fd_call(&c);
  return (int)libc_ret(r != NOT_ORIGINAL ? r : SYS2(fremovexattr, fd, name));
}

/* linkat of the descriptor itself: the new name is made (by linkat's
 * wrapper) for the clone's copy, never the original's inode. */
API int linkat(int fd1, const char *from, int fd2, const char *to, int flags) {
  ensure_init();
  if (UNLIKELY(names_fd(from, flags))) {
    struct fd_call c = {SYS_linkat, fd1, 0, 0, PATH_LATTR | PATH_NODIR, {(long)from, fd2, (long)to, flags}};
    long r = fd_call(&c);
    if (r != NOT_ORIGINAL) return (int)libc_ret(r);
  }
  return linkat_path(fd1, from, fd2, to, flags);
}

/* --- Through syscall() ----------------------------------------------------
 *
 * The same calls with the kernel's arguments; the *at ones that name a
 * path go on to do_path_syscall (linkat, which that does not take, to the
 * kernel). */
long do_cowfd_syscall(long nr, long a, long b, long c, long d, long e) {
  struct fd_call call = {nr, (int)a, 1, 0, PATH_LATTR, {b, c, d, e}};
  struct timespec ts[2];
  switch (nr) {
    case SYS_fchmod: call.op = CHMOD_OP; break;
    case SYS_fchown: call.op = lattr(path_chown_op(0, (uid_t)b, (gid_t)c)); break;
    case SYS_fsetxattr:
    case SYS_fremovexattr: break;
    case SYS_fchmodat2:
      if (!names_fd((const char *)b, (int)d)) return do_path_syscall(nr, a, b, c, d, e);
      call.needs_open = 0;
      call.op = CHMOD_OP;
      break;
    case SYS_fchownat:
      if (!names_fd((const char *)b, (int)e)) return do_path_syscall(nr, a, b, c, d, e);
      call.needs_open = 0;
      call.op = lattr(path_chown_op((int)e & ~AT_EMPTY_PATH, (uid_t)c, (gid_t)d));
      break;
    case SYS_utimensat:
      if (b ? !names_fd((const char *)b, (int)d) : a == AT_FDCWD) return do_path_syscall(nr, a, b, c, d, e);
      call.needs_open = !b;
      call.op = lattr(path_utimens_op((const struct timespec *)c, (int)d));
      break;
    case SYS_futimesat: {
      if (b || a == AT_FDCWD) return do_path_syscall(nr, a, b, c, d, e);
      /* The kernel's own check of tv_usec, then its utimensat. */
      const struct timeval *tv = (const struct timeval *)c;
      if (tv && (tv[0].tv_usec < 0 || tv[0].tv_usec >= 1000000 || tv[1].tv_usec < 0 || tv[1].tv_usec >= 1000000))
        return fail(EINVAL);
      return libc_ret(futimens_call((int)a, NULL, timeval_times(tv, ts), 0));
    }
    default: /* linkat */
      if (!names_fd((const char *)b, (int)e)) return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, 0));
      call.needs_open = 0;
      call.op = PATH_LATTR | PATH_NODIR;
  }
  long r = fd_call(&call);
  if (r != NOT_ORIGINAL) return libc_ret(r);
  if (nr == SYS_linkat) return linkat_path((int)a, (const char *)b, (int)c, (const char *)d, (int)e);
  return libc_ret(appshot_raw_syscall(nr, a, b, c, d, e, 0));
}
