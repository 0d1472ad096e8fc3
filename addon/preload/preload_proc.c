/*
 * /proc/<pid> paths: the application names processes by virtual PID, the
 * kernel's /proc by system PID. "/proc/<vpid>" and
 * "/proc/<vpid>/task/<vtid>" are rewritten; a virtual PID the table does
 * not know is a process that does not exist (ENOENT). Every other path,
 * /proc/self and /proc/thread-self included (they already name the caller),
 * goes through untouched, after a check of its first bytes.
 */
#include "preload.h"

#include <limits.h>
#include <string.h>

/* Parses a decimal PID at *p; advances *p. Returns 0 if there is none or it
 * does not end at '/' or the end of the string. */
static int parse_pid(const char **p, pid_t *out) {
  const char *s = *p;
  long v = 0;
  if (*s < '0' || *s > '9') return 0;
  for (; *s >= '0' && *s <= '9'; s++) {
    v = v * 10 + (*s - '0');
    if (v > INT32_MAX) return 0;
  }
  if (*s != '/' && *s != '\0') return 0;
  *out = (pid_t)v;
  *p = s;
  return 1;
}

static char *put_pid(char *d, pid_t v) {
  char tmp[12];
  int n = 0;
  do tmp[n++] = (char)('0' + v % 10);
  while ((v /= 10) > 0);
  while (n) *d++ = tmp[--n];
  return d;
}

/* Returns the path to hand to the kernel: `path` itself, or `buf` holding
 * the rewritten one; NULL with errno set when the path must fail. */
static const char *proc_path(const char *path, char buf[PATH_MAX]) {
  if (!path || path[0] != '/' || strncmp(path, "/proc/", 6) != 0 || !g_h)
    return path;
  const char *p = path + 6;
  pid_t vpid, spid, vtid = 0, stid = 0;
  if (!parse_pid(&p, &vpid)) return path;
  const char *rest = p;
  if (strncmp(p, "/task/", 6) == 0) {
    const char *q = p + 6;
    if (parse_pid(&q, &vtid)) rest = q;
  }
  if (vpid == 0 || !v2s_pid(vpid, &spid) ||
      (vtid && !v2s_pid(vtid, &stid))) {
    errno = ENOENT;
    return NULL;
  }
  if (strlen(rest) + 40 >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  char *d = put_pid((char *)memcpy(buf, "/proc/", 6) + 6, spid);
  if (vtid) d = put_pid((char *)memcpy(d, "/task/", 6) + 6, stid);
  strcpy(d, rest);
  return buf;
}

/* Declares `p`, the path to use, or returns `err` from the wrapper. */
#define PROC_PATH(p, path, err)          \
  ensure_init();                         \
  char p##_buf[PATH_MAX];                \
  const char *p = proc_path(path, p##_buf); \
  if (!p) return err

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
  PROC_PATH(p, path, -1);
  return REAL(open)(p, flags, mode);
}

API int open64(const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  PROC_PATH(p, path, -1);
  return REAL(open64)(p, flags, mode);
}

API int openat(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  PROC_PATH(p, path, -1);
  return REAL(openat)(fd, p, flags, mode);
}

API int openat64(int fd, const char *path, int flags, ...) {
  OPEN_MODE(flags, mode);
  PROC_PATH(p, path, -1);
  return REAL(openat64)(fd, p, flags, mode);
}

API int __open_2(const char *path, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(__open_2)(p, flags);
}

API int __open64_2(const char *path, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(__open64_2)(p, flags);
}

API int __openat_2(int fd, const char *path, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(__openat_2)(fd, p, flags);
}

API int __openat64_2(int fd, const char *path, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(__openat64_2)(fd, p, flags);
}

API int creat(const char *path, mode_t mode) {
  PROC_PATH(p, path, -1);
  return REAL(creat)(p, mode);
}

API FILE *fopen(const char *path, const char *mode) {
  PROC_PATH(p, path, NULL);
  return REAL(fopen)(p, mode);
}

API FILE *fopen64(const char *path, const char *mode) {
  PROC_PATH(p, path, NULL);
  return REAL(fopen64)(p, mode);
}

API DIR *opendir(const char *path) {
  PROC_PATH(p, path, NULL);
  return REAL(opendir)(p);
}

API int stat(const char *restrict path, struct stat *restrict st) {
  PROC_PATH(p, path, -1);
  return REAL(stat)(p, st);
}

API int stat64(const char *restrict path, struct stat64 *restrict st) {
  PROC_PATH(p, path, -1);
  return REAL(stat64)(p, st);
}

API int lstat(const char *restrict path, struct stat *restrict st) {
  PROC_PATH(p, path, -1);
  return REAL(lstat)(p, st);
}

API int lstat64(const char *restrict path, struct stat64 *restrict st) {
  PROC_PATH(p, path, -1);
  return REAL(lstat64)(p, st);
}

API int fstatat(int fd, const char *restrict path, struct stat *restrict st,
                int flags) {
  PROC_PATH(p, path, -1);
  return REAL(fstatat)(fd, p, st, flags);
}

API int fstatat64(int fd, const char *restrict path,
                  struct stat64 *restrict st, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(fstatat64)(fd, p, st, flags);
}

API int statx(int fd, const char *restrict path, int flags, unsigned int mask,
              struct statx *restrict st) {
  PROC_PATH(p, path, -1);
  return REAL(statx)(fd, p, flags, mask, st);
}

API int access(const char *path, int mode) {
  PROC_PATH(p, path, -1);
  return REAL(access)(p, mode);
}

API int faccessat(int fd, const char *path, int mode, int flags) {
  PROC_PATH(p, path, -1);
  return REAL(faccessat)(fd, p, mode, flags);
}

API ssize_t readlink(const char *restrict path, char *restrict out,
                     size_t size) {
  PROC_PATH(p, path, -1);
  return REAL(readlink)(p, out, size);
}

API ssize_t readlinkat(int fd, const char *restrict path, char *restrict out,
                       size_t size) {
  PROC_PATH(p, path, -1);
  return REAL(readlinkat)(fd, p, out, size);
}

API int chdir(const char *path) {
  PROC_PATH(p, path, -1);
  return REAL(chdir)(p);
}
