/*
 * Paths: the instance's REDIR PATH and copy-on-write rules, and every
 * path-taking wrapper (which also rewrite /proc/<vpid>, preload_proc.c).
 *
 * A rule applies to an absolute path the application passes that, once
 * normalized lexically ("//" and "/./" collapsed, "x/.." dropped), equals
 * `from` or starts with `from` + "/". Of several rules the longest `from`
 * wins. Relative paths, and *at() calls with a directory fd and a relative
 * path, are not rewritten: they name what the kernel finds from the
 * caller's working directory or that fd. (A working directory inside a
 * redirected tree is the rewritten one, since chdir is translated.)
 *
 * REDIR PATH: from/rest is to/rest, for every call.
 *
 * Copy-on-write (a composite view): the private path is to/rest.
 *  - If it exists, every call uses it.
 *  - Otherwise a call that only reads (open O_RDONLY without O_CREAT or
 *    O_TRUNC, stat, access, opendir, readlink, chdir) uses the original.
 *  - An open that may write (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC; creat;
 *    fopen "w", "a", "+"; truncate) first copies the original regular file
 *    to the private path: the private parent directories are made (those
 *    the original has, with their modes: a parent that exists on neither
 *    side stays missing, and the call fails with ENOENT as it would), the
 *    contents copied (copy_file_range, or read/write) into a temporary name
 *    beside it with the original's mode, then renamed into place without
 *    replacing: of two processes copying at once, one copy wins and both
 *    use it. O_TRUNC (or truncate to 0) skips the contents. An original
 *    that does not exist is not copied: the call creates the private file.
 *    An original that is not a regular file (a device, a FIFO, a
 *    directory) is used as it is.
 *  - mkdir and open O_CREAT|O_EXCL create on the private side (EEXIST if
 *    either side has the path); a rename's destination is the private
 *    side.
 *  - unlink, rmdir and a rename's source act on the private side; one that
 *    would remove a path the original has fails with EROFS, since the
 *    original would show through again (there are no whiteouts).
 *  - A directory present on both sides is listed from the private one
 *    (listings are not merged).
 *
 * Not rewritten: relative paths (see above), paths the kernel follows
 * itself (a symlink's target, a working directory inside `from`: calls
 * relative to it reach the original), and calls without a wrapper here:
 * exec's path, link, symlink, chmod, chown, utimensat, rename with flags
 * (renameat2), xattrs, mknod, statfs, realpath and getcwd's answers, and
 * programs that make raw system calls or link libc statically.
 *
 * Everything here runs on the caller's stack with raw system calls: no
 * allocation except an anonymous mapping while a copy falls back to
 * read/write.
 */
#include "preload.h"

#include <sys/mman.h>

/* --- Matching ------------------------------------------------------------ */

/* Lexically normalizes the absolute path `in` into out: "//" and "/./"
 * collapsed, "/x/.." dropped (without looking at symlinks), a trailing '/'
 * kept. Returns the length, or -1 when it does not fit. */
static long normalize(const char *in, char out[PATH_MAX]) {
  size_t o = 0;
  const char *s = in;
  int trailing = 0;
  while (*s) {
    while (*s == '/') s++;
    if (!*s) {
      trailing = 1;
      break;
    }
    const char *e = s;
    while (*e && *e != '/') e++;
    size_t n = (size_t)(e - s);
    trailing = 0;
    if (n == 1 && s[0] == '.') {
      trailing = 1;
    } else if (n == 2 && s[0] == '.' && s[1] == '.') {
      while (o > 0 && out[o - 1] != '/') o--;
      if (o > 0) o--;
      trailing = 1;
    } else {
      if (o + n + 3 > PATH_MAX) return -1;
      out[o++] = '/';
      memcpy(out + o, s, n);
      o += n;
    }
    s = e;
  }
  if (o == 0) out[o++] = '/';
  else if (trailing) out[o++] = '/';
  out[o] = '\0';
  return (long)o;
}

/* The rule that applies to the normalized path, or NULL. */
static const struct appshot_redir *match(const struct appshot_instance *in,
                                         const char *norm) {
  const struct appshot_redir *best = NULL;
  uint32_t n = in->redirs < APPSHOT_REDIRS ? in->redirs : APPSHOT_REDIRS;
  for (uint32_t i = 0; i < n; i++) {
    const struct appshot_redir *r = &in->redir[i];
    uint32_t fl = r->from_len;
    if (fl == 0 || fl >= APPSHOT_PATH_MAX || r->from[0] != '/' ||
        r->to[0] != '/' || (best && fl <= best->from_len))
      continue;
    if (strncmp(norm, r->from, fl) == 0 &&
        (norm[fl] == '\0' || norm[fl] == '/'))
      best = r;
  }
  return best;
}

/* --- Raw file helpers (no wrapper, no libc state) ------------------------ */

static int lexists(const char *p, struct stat *st) {
  return sys6(SYS_newfstatat, AT_FDCWD, (long)p, (long)st, AT_SYMLINK_NOFOLLOW,
              0, 0) == 0;
}

/* Makes the directories leading to priv (everything up to its last '/').
 * Inside `to` (to_len bytes of priv): mkdir -p. Below it: the directories
 * the original has (orig = from + the same rest; off = from_len - to_len),
 * with the original's modes; one the original does not have either stops
 * there. Errors are left to the call that follows. Both strings are
 * modified and restored. */
static void make_parents(char *priv, size_t to_len, char *orig, long off) {
  for (char *s = priv + 1; *s; s++) {
    if (*s != '/') continue;
    size_t i = (size_t)(s - priv);
    struct stat st;
    *s = '\0';
    if (i <= to_len) {
      SYS3(mkdirat, AT_FDCWD, priv, 0755);
    } else if (!lexists(priv, &st)) {
      char *o = orig + (long)i + off, save = *o;
      *o = '\0';
      int dir = sys6(SYS_newfstatat, AT_FDCWD, (long)orig, (long)&st, 0, 0,
                     0) == 0 && S_ISDIR(st.st_mode);
      *o = save;
      if (!dir) {
        *s = '/';
        return;
      }
      if (SYS3(mkdirat, AT_FDCWD, priv, st.st_mode & 07777) == 0)
        SYS2(chmod, priv, st.st_mode & 07777); /* the umask took bits */
    }
    *s = '/';
  }
}

static int write_all(int fd, const char *p, long n) {
  while (n > 0) {
    long w = SYS3(write, fd, p, n);
    if (w == -EINTR) continue;
    if (w < 0) return (int)w;
    p += w;
    n -= w;
  }
  return 0;
}

/* Copies the rest of src into dst, from their current offsets. */
static int copy_contents(int src, int dst) {
  for (;;) {
    long n = sys6(SYS_copy_file_range, src, 0, dst, 0, 1L << 30, 0);
    if (n > 0) continue;
    if (n == 0) return 0;
    if (n == -EINTR) continue;
    if (n != -EXDEV && n != -EINVAL && n != -ENOSYS && n != -EOPNOTSUPP)
      return (int)n;
    break;
  }
  enum { BUF = 64 * 1024 };
  long m = sys6(SYS_mmap, 0, BUF, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m < 0 && m > -4096) return (int)m;
  char *buf = (char *)m;
  int err = 0;
  for (;;) {
    long n = SYS3(read, src, buf, BUF);
    if (n == -EINTR) continue;
    if (n <= 0) {
      err = (int)n;
      break;
    }
    if ((err = write_all(dst, buf, n)) != 0) break;
  }
  SYS2(munmap, buf, BUF);
  return err;
}

static char *put_num(char *d, unsigned long v) {
  char tmp[24];
  int n = 0;
  do tmp[n++] = (char)('0' + v % 10);
  while ((v /= 10) > 0);
  while (n) *d++ = tmp[--n];
  return d;
}

/* A write is about to go to the private path of a COW rule that does not
 * exist yet. orig (in a buffer of ours, PATH_MAX) is the original; priv
 * the private path. Returns 0 to use priv, 1 to use orig (not a regular
 * file), or -errno. orig's buffer is used as scratch once it is done. */
static int copy_up(char *priv, size_t to_len, char *orig, long off,
                   int contents) {
  long src = SYS3(openat, AT_FDCWD, orig, O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (src == -ENOENT || src == -ENOTDIR) {
    make_parents(priv, to_len, orig, off); /* the call creates it, or not */
    return 0;
  }
  if (src < 0) return (int)src;
  struct stat st;
  long r = SYS2(fstat, src, &st);
  if (r < 0 || !S_ISREG(st.st_mode)) {
    SYS1(close, src);
    return r < 0 ? (int)r : 1;
  }
  make_parents(priv, to_len, orig, off);
  /* The temporary name, in orig's buffer: priv + ".appshot-cow.<tid>". */
  size_t pl = strlen(priv);
  if (pl + 40 >= PATH_MAX) {
    SYS1(close, src);
    return -ENAMETOOLONG;
  }
  char *tmp = orig;
  memcpy(tmp, priv, pl);
  char *d = put_num((char *)memcpy(tmp + pl, ".appshot-cow.", 13) + 13,
                    (unsigned long)SYS0(gettid));
  *d = '\0';
  long dst = -EEXIST;
  for (int i = 0; i < 2 && dst == -EEXIST; i++) {
    dst = SYS4(openat, AT_FDCWD, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
               0600);
    if (dst == -EEXIST) SYS3(unlinkat, AT_FDCWD, tmp, 0); /* a dead copy's */
  }
  if (dst < 0) {
    SYS1(close, src);
    return (int)dst;
  }
  int err = contents ? copy_contents((int)src, (int)dst) : 0;
  if (!err) err = (int)SYS2(fchmod, dst, st.st_mode & 07777);
  SYS1(close, src);
  SYS1(close, dst);
  int left = 1; /* tmp still there */
  if (!err) {
    /* Not replacing: another process may have copied it meanwhile, and
     * may be writing to its copy already. Then that copy is the one. */
    err = (int)sys6(SYS_renameat2, AT_FDCWD, (long)tmp, AT_FDCWD, (long)priv,
                    RENAME_NOREPLACE, 0);
    if (err == -EINVAL) { /* a file system without RENAME_NOREPLACE */
      err = (int)SYS5(linkat, AT_FDCWD, tmp, AT_FDCWD, priv, 0);
      if (err == -EPERM) err = (int)SYS2(rename, tmp, priv); /* no links */
    } else if (err == 0) {
      left = 0;
    }
    if (err == -EEXIST) err = 0;
  }
  if (left) SYS3(unlinkat, AT_FDCWD, tmp, 0);
  return err;
}

/* --- app_path ------------------------------------------------------------ */

const char *path_slow(const char *path, enum path_op op, char buf[PATH_MAX]) {
  const char *p = path;
  if (strncmp(path, "/proc/", 6) == 0) {
    p = proc_path(path, buf);
    if (!p) return NULL;
  }
  const struct appshot_instance *in = &g_h->instance;
  if (!in->redirs) return p;
  char norm[PATH_MAX];
  if (normalize(p, norm) < 0) return p; /* too long to be ours to rewrite */
  const struct appshot_redir *r = match(in, norm);
  if (!r) return p;
  /* buf = to + rest (buf may hold p: norm is a copy). */
  size_t fl = r->from_len, tl = strnlen(r->to, APPSHOT_PATH_MAX - 1);
  size_t rl = strlen(norm + fl);
  if (tl + rl >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  memcpy(buf, r->to, tl);
  memcpy(buf + tl, norm + fl, rl + 1);
  if (r->kind != APPSHOT_REDIR_COW) return buf;

  struct stat st;
  long off = (long)fl - (long)tl;
  switch (op) {
    case PATH_READ:
      if (lexists(buf, &st)) return buf;
      break; /* the original */
    case PATH_WRITE:
    case PATH_TRUNC: {
      if (lexists(buf, &st)) return buf;
      /* norm is scratch for copy_up once it has opened the original; it
       * is intact when the answer is "use the original" (1). */
      int rc = copy_up(buf, tl, norm, off, op == PATH_WRITE);
      if (rc == 0) return buf;
      if (rc < 0) {
        errno = -rc;
        return NULL;
      }
      break; /* not a regular file: the original */
    }
    case PATH_CREATE:
      if (lexists(buf, &st)) return buf; /* EEXIST */
      if (lexists(norm, &st)) break;     /* EEXIST, from the original */
      make_parents(buf, tl, norm, off);
      return buf;
    case PATH_REMOVE:
      if (lexists(norm, &st)) {
        errno = EROFS;
        return NULL;
      }
      return buf;
    case PATH_TARGET:
      if (!lexists(buf, &st)) make_parents(buf, tl, norm, off);
      return buf;
  }
  memcpy(buf, norm, fl + rl + 1);
  return buf;
}

/* --- The wrappers ---------------------------------------------------------
 *
 * Calls that are cancellation points or build libc objects go to the real
 * function; the others are raw system calls. */

static enum path_op open_op(int flags) {
  /* Fails on an existing file: no copy needed to find out. */
  if ((flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL)) return PATH_CREATE;
  if (flags & O_TRUNC) return PATH_TRUNC;
  if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_CREAT)) return PATH_WRITE;
  return PATH_READ;
}

static enum path_op fopen_op(const char *mode) {
  if (!mode) return PATH_READ;
  if (mode[0] == 'w') return PATH_TRUNC;
  if (mode[0] == 'a' || strchr(mode, '+')) return PATH_WRITE;
  return PATH_READ;
}

/* The mode argument exists only when the flags create a file. */
#define OPEN_MODE(flags, mode)                          \
  mode_t mode = 0;                                      \
  if ((flags) & (O_CREAT | __O_TMPFILE)) {              \
    va_list ap;                                         \
    va_start(ap, flags);                                \
    mode = va_arg(ap, mode_t);                          \
    va_end(ap);                                         \
  }

API int open(const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(open)(p, flags, mode);
}

API int open64(const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(open64)(p, flags, mode);
}

API int openat(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(openat)(fd, p, flags, mode);
}

API int openat64(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(openat64)(fd, p, flags, mode);
}

API int __open_2(const char *path, int flags) {
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(__open_2)(p, flags);
}

API int __open64_2(const char *path, int flags) {
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(__open64_2)(p, flags);
}

API int __openat_2(int fd, const char *path, int flags) {
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(__openat_2)(fd, p, flags);
}

API int __openat64_2(int fd, const char *path, int flags) {
  APP_PATH(p, path, open_op(flags), -1);
  return REAL(__openat64_2)(fd, p, flags);
}

API int creat(const char *path, mode_t mode) {
  APP_PATH(p, path, PATH_TRUNC, -1);
  return REAL(creat)(p, mode);
}

API int creat64(const char *path, mode_t mode) {
  APP_PATH(p, path, PATH_TRUNC, -1);
  return REAL(creat64)(p, mode);
}

API FILE *fopen(const char *path, const char *mode) {
  APP_PATH(p, path, fopen_op(mode), NULL);
  return REAL(fopen)(p, mode);
}

API FILE *fopen64(const char *path, const char *mode) {
  APP_PATH(p, path, fopen_op(mode), NULL);
  return REAL(fopen64)(p, mode);
}

API DIR *opendir(const char *path) {
  APP_PATH(p, path, PATH_READ, NULL);
  return REAL(opendir)(p);
}

API int stat(const char *restrict path, struct stat *restrict st) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(stat)(p, st);
}

API int stat64(const char *restrict path, struct stat64 *restrict st) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(stat64)(p, st);
}

API int lstat(const char *restrict path, struct stat *restrict st) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(lstat)(p, st);
}

API int lstat64(const char *restrict path, struct stat64 *restrict st) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(lstat64)(p, st);
}

API int fstatat(int fd, const char *restrict path, struct stat *restrict st,
                int flags) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(fstatat)(fd, p, st, flags);
}

API int fstatat64(int fd, const char *restrict path,
                  struct stat64 *restrict st, int flags) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(fstatat64)(fd, p, st, flags);
}

API int statx(int fd, const char *restrict path, int flags, unsigned int mask,
              struct statx *restrict st) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(statx)(fd, p, flags, mask, st);
}

API int access(const char *path, int mode) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(access)(p, mode);
}

API int faccessat(int fd, const char *path, int mode, int flags) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(faccessat)(fd, p, mode, flags);
}

API ssize_t readlink(const char *restrict path, char *restrict out,
                     size_t size) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(readlink)(p, out, size);
}

API ssize_t readlinkat(int fd, const char *restrict path, char *restrict out,
                       size_t size) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(readlinkat)(fd, p, out, size);
}

API int chdir(const char *path) {
  APP_PATH(p, path, PATH_READ, -1);
  return REAL(chdir)(p);
}

API int mkdir(const char *path, mode_t mode) {
  APP_PATH(p, path, PATH_CREATE, -1);
  return (int)libc_ret(SYS3(mkdirat, AT_FDCWD, p, mode));
}

API int mkdirat(int fd, const char *path, mode_t mode) {
  APP_PATH(p, path, PATH_CREATE, -1);
  return (int)libc_ret(SYS3(mkdirat, fd, p, mode));
}

API int unlink(const char *path) {
  APP_PATH(p, path, PATH_REMOVE, -1);
  return (int)libc_ret(SYS3(unlinkat, AT_FDCWD, p, 0));
}

API int unlinkat(int fd, const char *path, int flags) {
  APP_PATH(p, path, PATH_REMOVE, -1);
  return (int)libc_ret(SYS3(unlinkat, fd, p, flags));
}

API int rmdir(const char *path) {
  APP_PATH(p, path, PATH_REMOVE, -1);
  return (int)libc_ret(SYS3(unlinkat, AT_FDCWD, p, AT_REMOVEDIR));
}

/* glibc's remove() calls unlink and rmdir internally, past our wrappers. */
API int remove(const char *path) {
  APP_PATH(p, path, PATH_REMOVE, -1);
  long r = SYS3(unlinkat, AT_FDCWD, p, 0);
  if (r == -EISDIR) r = SYS3(unlinkat, AT_FDCWD, p, AT_REMOVEDIR);
  return (int)libc_ret(r);
}

API int rename(const char *from, const char *to) {
  APP_PATH(a, from, PATH_REMOVE, -1);
  char b_buf[PATH_MAX];
  const char *b = app_path(to, PATH_TARGET, b_buf);
  if (!b) return -1;
  return (int)libc_ret(SYS4(renameat, AT_FDCWD, a, AT_FDCWD, b));
}

API int renameat(int fd1, const char *from, int fd2, const char *to) {
  APP_PATH(a, from, PATH_REMOVE, -1);
  char b_buf[PATH_MAX];
  const char *b = app_path(to, PATH_TARGET, b_buf);
  if (!b) return -1;
  return (int)libc_ret(SYS4(renameat, fd1, a, fd2, b));
}

API int truncate(const char *path, off_t length) {
  APP_PATH(p, path, length ? PATH_WRITE : PATH_TRUNC, -1);
  return (int)libc_ret(SYS2(truncate, p, length));
}

API int truncate64(const char *path, off64_t length) {
  APP_PATH(p, path, length ? PATH_WRITE : PATH_TRUNC, -1);
  return (int)libc_ret(SYS2(truncate, p, length));
}
