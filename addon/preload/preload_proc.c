/*
 * /proc/<pid> paths: the application names processes by virtual PID, the
 * kernel's /proc by system PID. "/proc/<vpid>" and
 * "/proc/<vpid>/task/<vtid>" are rewritten, and so is
 * "/proc/self/task/<vtid>" (there a number the table does not know, a
 * system TID as a listing the library did not translate gives (a raw
 * getdents64, glob), goes through); a virtual PID
 * the table does not know is a process that does not exist (ENOENT). Every other path, /proc/self and
 * /proc/thread-self included (they already name the caller), goes through
 * untouched, after a check of its first bytes.
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

/* Writes "/proc/<spid or self>[/task/<stid>]<rest>" into buf; NULL with
 * errno set if it would not fit. */
static const char *put_proc_path(char buf[PATH_MAX], pid_t spid, pid_t stid, const char *rest) {
  if (strlen(rest) + 40 >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  char *d = (char *)memcpy(buf, "/proc/", 6) + 6;
  d = spid ? put_decimal(d, spid) : (char *)memcpy(d, "self", 4) + 4;
  if (stid) d = put_decimal((char *)memcpy(d, "/task/", 6) + 6, stid);
  strcpy(d, rest);
  return buf;
}

/* Returns the path to hand to the kernel: `path` itself, or `buf` holding
 * the rewritten one; NULL with errno set when the path must fail. The
 * wrappers that use it are in preload_path.c (path_slow). */
const char *proc_path(const char *path, char buf[PATH_MAX]) {
  if (!path || path[0] != '/' || strncmp(path, "/proc/", 6) != 0 || !g_h)
    return path;
  const char *p = path + 6;
  pid_t vpid, spid, vtid = 0, stid = 0;
  /* "/proc/self/task/<vtid>": the caller's own process, one of its
   * threads by the TID gettid gave it. A number the table does not know
   * goes through as it is: a listing we do not see (preload_dents.c)
   * gives system TIDs. */
  if (strncmp(p, "self/task/", 10) == 0) {
    const char *q = p + 10;
    if (!parse_pid(&q, &vtid) || !v2s_pid(vtid, &stid)) return path;
    return put_proc_path(buf, 0, stid, q);
  }
  if (!parse_pid(&p, &vpid)) return path;
  const char *rest = p;
  if (strncmp(p, "/task/", 6) == 0) {
    const char *q = p + 6;
    /* task 0 is no thread: left in the rest, for the kernel to refuse */
    if (parse_pid(&q, &vtid) && vtid) rest = q;
  }
  if (vpid == 0 || !v2s_pid(vpid, &spid) ||
      (vtid && !v2s_pid(vtid, &stid))) {
    errno = ENOENT;
    return NULL;
  }
  return put_proc_path(buf, spid, stid, rest);
}
