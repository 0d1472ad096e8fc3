/*
 * /proc/<pid> paths: the application names processes by virtual PID, the
 * kernel's /proc by system PID. "/proc/<vpid>" and
 * "/proc/<vpid>/task/<vtid>" are rewritten, and so is
 * "/proc/self/task/<vtid>" (there a number the table does not know, a
 * system TID as a listing the library did not translate gives (a raw
 * getdents64, glob), goes through); a virtual PID
 * the table does not know is a process that does not exist (ENOENT). Every other path, /proc/self and
 * /proc/thread-self included (they already name the caller), goes through
 * untouched, after a check of its first bytes. A path the kernel reads
 * as another (repeated slashes, ".", "..") is made plain first, a ".."
 * whose parent no name tells resolved by the kernel when a number follows
 * it (plain_path). The same numbers in a path
 * relative to a descriptor of /proc or a working directory inside it:
 * proc_at_path, below; from a directory outside /proc ("proc/<vpid>"
 * under "/"): proc_rel_join. A process's root, /proc/<vpid>/root/..., is taken
 * through the REDIR PATH rules when one applies (proc_root_rest, at the
 * end).
 */
#include "preload.h"

#include <limits.h>
#include <string.h>
#include <sys/vfs.h>

static size_t decimal_at(const char *s, size_t len, pid_t *out);
static const char *proc_path_plain(const char *path, char buf[PATH_MAX]);

/* The places in a path where a number may be read in /proc's own
 * directory when the path is walked from outside it, in order:
 *  - what follows the last "proc" component before the first number
 *    after one ("proc/<n>", "../proc/./<n>", "proc/self/task/<n>",
 *    "proc/thread-self/../<n>"). Anchored at the "proc" component, not at
 *    the number: the directory before a number may be /proc/<pid>/task
 *    (r403 L1), which proc_path knows from its name under /proc;
 *  - a number right after a "..", a "cwd" or a descriptor "fd/<n>" ("."
 *    and empty components passed over): no name tells where those lead,
 *    which may be /proc ("fd/../../<n>" and "fd/3/<n>" under /dev,
 *    "lnk/../../<n>" with lnk a link to /dev/fd: review r442 F1).
 * Which of those is this process's /proc is for the caller to ask (a
 * stat: proc_anchor_kind, proc_rel_join); the first that is, is where
 * the kernel's walk enters it. Not a ".." with a number further on: gcc's
 * ".../12/../../include/c++/12/..." paths are many, and the kernel's to
 * read (r388 M2). Names only, one pass over the path. */
struct proc_anchors {
  const char *c;       /* the next component */
  const char *proc;    /* a "proc" component no number followed yet */
  const char *pending; /* a number after both such a "proc" and a link */
  int link;            /* the last component ("." and empty ones passed over) was "..", "cwd" or "fd/<n>" */
  int fd;              /* ... was "fd" */
};

/* The next of them (a pointer to the number, or to what follows
 * "proc/"), or NULL. */
static const char *next_proc_anchor(struct proc_anchors *a) {
  const char *r = a->pending;
  if (r) {
    a->pending = NULL;
    return r;
  }
  while (*a->c) {
    const char *c = a->c, *e = c;
    while (*e && *e != '/') e++;
    a->c = *e ? e + 1 : e;
    size_t len = (size_t)(e - c);
    if (len == 0 || (len == 1 && c[0] == '.')) continue;
    int fd = a->fd;
    a->fd = len == 2 && c[0] == 'f' && c[1] == 'd';
    if (len == 4 && !memcmp(c, "proc", 4) && *e == '/') {
      a->proc = c, a->link = 0;
      continue;
    }
    const char *proc = a->proc, *link = a->link ? c : NULL;
    int number = starts_with_number(c), digits = fd;
    for (const char *d = c; digits && d < e; d++) digits = *d >= '0' && *d <= '9';
    a->link = digits || (len == 2 && c[0] == '.' && c[1] == '.') || (len == 3 && !memcmp(c, "cwd", 3));
    if (!number) continue;
    a->proc = NULL;
    if (proc) {
      a->pending = link;
      return proc + 5;
    }
    if (link) return link;
  }
  return NULL;
}

NOINLINE int rel_reaches_number(const char *path) {
  struct proc_anchors a = {path, NULL, NULL, 0, 0};
  return next_proc_anchor(&a) != NULL;
}

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

/* Writes "[/proc/]<spid or self>[/task/<stid>]<rest>" into buf (the
 * prefix if `absolute`); NULL with errno set if it would not fit. */
static const char *put_ids_path(char buf[PATH_MAX], int absolute, pid_t spid,
                                pid_t stid, const char *rest) {
  if (strlen(rest) + 40 >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  char *d = absolute ? (char *)memcpy(buf, "/proc/", 6) + 6 : buf;
  d = spid ? put_decimal(d, spid) : (char *)memcpy(d, "self", 4) + 4;
  if (stid) d = put_decimal((char *)memcpy(d, "/task/", 6) + 6, stid);
  strcpy(d, rest);
  return buf;
}

static const char *put_proc_path(char buf[PATH_MAX], pid_t spid, pid_t stid, const char *rest) {
  return put_ids_path(buf, 1, spid, stid, rest);
}

/* What follows "/proc/" (or a descriptor of /proc), "<vpid>[/task/<vtid>]
 * <rest>", with the system ids, into buf (after "/proc/" if `absolute`). */
static const char *pid_rest(const char *p, char buf[PATH_MAX], int absolute) {
  pid_t vpid, spid, vtid = 0, stid = 0;
  if (!parse_pid(&p, &vpid)) return NULL;
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
  return put_ids_path(buf, absolute, spid, stid, rest);
}

/* Whether name[0..len) is one of `names` (NULL-ended). */
static int name_in(const char *name, size_t len, const char *const *names) {
  for (; *names; names++)
    if (strlen(*names) == len && !memcmp(name, *names, len)) return 1;
  return 0;
}

/* Whether name[0..len) is a number the PID table knows: a process or
 * thread directory of the application's (one it does not know is left
 * for the kernel, or proc_path, to refuse). */
static int known_id(const char *name, size_t len) {
  pid_t v, s;
  char num[12];
  if (len == 0 || len >= sizeof num) return 0;
  memcpy(num, name, len);
  num[len] = '\0';
  const char *p = num;
  return parse_pid(&p, &v) && !*p && v > 0 && g_h && v2s_pid(v, &s);
}

/* The parent of the directory out[0..n) names (n > 0, out[n - 1] == '/'),
 * as the kernel would find it, in place: the new length (ending with
 * '/'), or 0 when it is not sound to say by the name. The directories of
 * a process (/proc/<pid>, self) and of a thread (/proc/<pid>/task/<tid>,
 * thread-self) hold these plain directories, whose parent they are. */
static size_t dotdot(char *out, size_t n) {
  static const char *const process_dirs[] = {"fd", "fdinfo", "ns", "net", "attr", "map_files", "task", NULL};
  static const char *const thread_dirs[] = {"fd", "fdinfo", "ns", "net", "attr", NULL};
  if (n == 1) return 1;                        /* "/..": the root */
  if (n == 6 && !memcmp(out, "/proc/", 6)) return 1; /* /proc/..: "/" */
  if (n < 7 || memcmp(out, "/proc/", 6)) return 0; /* not under /proc */
  /* /proc/net links to self/net: its parent is /proc/self. */
  if (n == 10 && !memcmp(out + 6, "net/", 4)) {
    memcpy(out + 6, "self/", 5);
    return 11;
  }
  /* The components after "/proc/": at most four matter. */
  const char *c[5];
  size_t len[5], k = 0;
  for (size_t i = 6; i < n && k < 5; k++) {
    c[k] = out + i;
    while (out[i] != '/') i++;
    len[k] = (size_t)(out + i - c[k]);
    i++;
  }
  if (k > 4) return 0;
  /* c[0]: a process (its parent /proc) or thread-self (its parent the
   * caller's task directory: it links to "<pid>/task/<tid>"). */
  int thread_self = len[0] == 11 && !memcmp(c[0], "thread-self", 11);
  int process = (len[0] == 4 && !memcmp(c[0], "self", 4)) || known_id(c[0], len[0]);
  if (!thread_self && !process) return 0;
  if (k == 1) {
    if (process) return 6;
    memcpy(out + 6, "self/task/", 10);
    return 16;
  }
  /* c[1]: a plain directory of the process or thread; in a process's
   * task directory, a thread's (c[2]), and in that one its plain
   * directories (c[3]). */
  const char *const *dirs = process ? process_dirs : thread_dirs;
  int in_task = process && len[1] == 4 && !memcmp(c[1], "task", 4);
  if (k == 2) return name_in(c[1], len[1], dirs) ? (size_t)(c[1] - out) : 0;
  if (!in_task || !known_id(c[2], len[2])) return 0;
  if (k == 3) return (size_t)(c[2] - out);
  return name_in(c[3], len[3], thread_dirs) ? (size_t)(c[3] - out) : 0;
}

/* The parent of the directory out[0..n) names (n > 0, out[n - 1] == '/'),
 * by its name alone: sound only for a name the kernel gave (no symbolic
 * link in it). */
static size_t parent_of(const char *out, size_t n) {
  if (n == 1) return 1;
  size_t i = n - 2;
  while (out[i] != '/') i--;
  return i + 1;
}

/* Whether a component of `s` (what follows a ".." in a path) is a number:
 * a process or thread the path may name by its id, once the ".." is
 * resolved. */
static int number_follows(const char *s) {
  for (; *s; s++)
    if (s[0] == '/' && starts_with_number(s + 1)) return 1;
  return 0;
}

/* Whether the ".." after directory out[0..n) (absolute, no parent in its
 * name) is resolved by the kernel first (resolved_dir) because a number
 * follows: a directory of /proc ("/proc/sys/../<vpid>",
 * "/proc/self/cwd/../<n>"), which the kernel would read by a system id.
 * Not a process's root in the rules' reading (`letters`): they take the
 * rest as the root's, by its letters; the kernel's reading resolves it
 * as without rules (r432 N2). A ".." outside /proc is kept for the kernel:
 * gcc's ".../12/../../../../include/c++/12/..." pays nothing and gets the
 * kernel's errors (review r388 M2); "/tmp/../proc/<vpid>" is asked
 * without a descriptor or a name (proc_path_unplain, proc_rel_join), and
 * never before path rules (r388 H1: a directory opened before them is
 * the real one, not what the rules make of it). */
static int dotdot_resolved(const char *out, size_t n, const char *rest, int letters) {
  if (n <= 6 || memcmp(out, "/proc/", 6) != 0) return 0;
  if (letters) {
    const char *c = memchr(out + 6, '/', n - 6); /* "/proc/<who>/root/" */
    if (c && (size_t)(out + n - c) >= 6 && !memcmp(c, "/root/", 6)) return 0;
  }
  return number_follows(rest);
}

/* Opens absolute `path` (O_PATH, `flags`) as openat2 with the caller's
 * resolve flags walks it: a descriptor, or -errno, the kernel's refusal
 * of a link on the way (ELOOP; EXDEV for a magic link under
 * RESOLVE_BENEATH: an absolute path is never beneath, so it is asked as
 * NO_MAGICLINKS, which is what BENEATH refuses of a link of /proc's).
 * Without resolve flags an openat. */
static long open_walk(const char *path, int flags, int resolve) {
  flags |= O_PATH | O_CLOEXEC;
  if (!resolve) return SYS4(openat, AT_FDCWD, path, flags, 0);
  struct { uint64_t flags, mode, resolve; } how = {(uint64_t)flags, 0, 0};
  how.resolve = (uint64_t)(resolve & (RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_));
  if (resolve & RESOLVE_BENEATH_) how.resolve |= RESOLVE_NO_MAGICLINKS_;
  long fd = SYS4(openat2, AT_FDCWD, path, &how, sizeof how);
  if (fd == -ELOOP && !(resolve & (RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_))) fd = -EXDEV;
  return fd;
}

/* 0 when the kernel's walk of absolute `path` (system ids) keeps the
 * resolve flags, else its errno. One openat2 and close, asked only for
 * openat2 with such flags, at a link the view would stand in for. */
static NOINLINE int walk_refused(const char *path, int resolve) {
  long fd = open_walk(path, 0, resolve);
  if (fd < 0) return (int)-fd;
  SYS1(close, fd);
  return 0;
}

/* walk_refused of a walk through /dev/fd: also EXDEV under
 * RESOLVE_BENEATH (its target, /proc/self/fd, is absolute; reached from
 * a relative path joined beneath a directory: an absolute one path_slow
 * leaves to the kernel). */
static int dev_fd_refused(const char *path, int resolve) {
  int refused = walk_refused(path, resolve);
  return refused ? refused : (resolve & RESOLVE_BENEATH_) ? EXDEV : 0;
}

/* The directory out[0..n) (absolute, ending with '/') as the kernel
 * resolves it, for a ".." after it whose parent no name tells
 * (/proc/sys/.., /tmp/.., a link such as /proc/self/cwd): opened (O_PATH,
 * with its virtual ids made the system's), its link read, the ids in the
 * answer made virtual again. Into out, ending with '/': its length. 0 when
 * it cannot be said (no /proc to read the link, a directory removed, or
 * one inside a process outside the application): the ".." is then left
 * for the kernel, as before. -1 with errno when the directory cannot be
 * opened: the kernel's walk of the whole path fails there too (ENOENT,
 * ENOTDIR, EACCES, ELOOP; a virtual id the application does not hold),
 * or could not be checked (EMFILE), which is not let through either: a
 * virtual id after the ".." would be read as a system one. Asked only for
 * such a ".." followed by a number (number_follows): a few system calls,
 * in a frame of its own, never on a common path. With `resolve` (openat2's
 * RESOLVE_NO_SYMLINKS, NO_MAGICLINKS, BENEATH) opened as the caller's walk
 * goes: a link it refuses (self, cwd, root, fd/<n>) is its errno, not the
 * directory the link leads to (r432 N6). */
static NOINLINE long resolved_dir(char *out, size_t n, int resolve) {
  char sys[PATH_MAX];
  out[n] = '\0';
  const char *p = proc_path_plain(out, sys);
  if (!p) return -1;
  long fd = open_walk(p, O_DIRECTORY, resolve);
  if (fd < 0) {
    errno = (int)-fd;
    return -1;
  }
  char link[32] = "/proc/self/fd/";
  *put_decimal(link + 14, (unsigned long)fd) = '\0';
  long m = SYS4(readlinkat, AT_FDCWD, link, sys, PATH_MAX - 1);
  struct stat opened, named;
  long got = SYS2(fstat, fd, &opened);
  SYS1(close, fd);
  static const char deleted[] = " (deleted)";
  enum { DELETED = sizeof deleted - 1 };
  if (m <= 0 || m >= PATH_MAX - 1 || sys[0] != '/' || (m > DELETED && !memcmp(sys + m - DELETED, deleted, DELETED)))
    return 0;
  /* The link's text is a path from our root only if it names the
   * directory opened: a working directory left outside a chroot, or one
   * in another mount namespace, links to a name that is another file
   * here (review r388 M3). */
  sys[m] = '\0';
  if (got < 0 || SYS4(newfstatat, AT_FDCWD, sys, &named, AT_NO_AUTOMOUNT) < 0 || named.st_dev != opened.st_dev ||
      named.st_ino != opened.st_ino)
    return 0;
  if (m > 6 && !memcmp(sys, "/proc/", 6) && sys[6] >= '0' && sys[6] <= '9') {
    pid_t spid, vpid;
    if (!decimal_at(sys + 6, (size_t)m - 6, &spid) || !appshot_s2v(g_h, APPSHOT_PID, spid, &vpid)) return 0;
    m = (long)proc_answer_to_virtual(sys, (size_t)m, PATH_MAX - 1);
  }
  if (m + 1 >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return -1;
  }
  memcpy(out, sys, (size_t)m);
  if (out[m - 1] != '/') out[m++] = '/';
  return m;
}

/* Whether absolute out[0..n) (a directory of /proc, taken by its name) is
 * under a symbolic link of /proc's: "self", "thread-self" or "net" right
 * after "/proc/". */
static int under_proc_symlink(const char *out, size_t n) {
  if (n < 7 || memcmp(out, "/proc/", 6)) return 0;
  const char *c = out + 6, *e = memchr(c, '/', n - 6);
  size_t len = e ? (size_t)(e - c) : n - 6;
  return (len == 4 && !memcmp(c, "self", 4)) || (len == 11 && !memcmp(c, "thread-self", 11)) || (len == 3 && !memcmp(c, "net", 3));
}

int plain_path(const char *path, char out[PATH_MAX], int letters, int resolve) {
  size_t n = 0;
  /* Set once a ".." was kept: what follows it is the kernel's to resolve,
   * and a later ".." is no longer the parent of what out shows. */
  int kept = 0;
  /* out[0..canon) is a directory as the kernel named it (resolved_dir):
   * its parent is in its name. */
  size_t canon = 0;
  for (const char *s = path; *s;) {
    if (s[0] == '/' && n && out[n - 1] == '/') {
      s++; /* a repeated slash */
      continue;
    }
    if (s[0] == '.' && n && out[n - 1] == '/' && (s[1] == '/' || s[1] == '\0')) {
      /* A "." component, taken out unless it is the last one: the kernel
       * hands that one to the call (rmdir "x/." is EINVAL, mkdir EEXIST),
       * and the plain path is what the kernel gets (proc_path). */
      const char *t = s + 1;
      while (*t == '/') t++;
      if (*t) {
        s = t;
        continue;
      }
    }
    if (!kept && s[0] == '.' && s[1] == '.' && n && out[n - 1] == '/' && (s[2] == '/' || s[2] == '\0')) {
      int named = n == canon; /* the parent of a name the kernel gave */
      size_t up = named ? parent_of(out, n) : dotdot(out, n);
      /* By the name after a link the kernel would follow (a name it gave
       * has none): under RESOLVE_NO_SYMLINKS its walk stops at the link
       * (r432 N6: "/proc/self/../<vpid>" opened the process). */
      if (up && !named && UNLIKELY(resolve & RESOLVE_NO_SYMLINKS_) && under_proc_symlink(out, n)) {
        errno = ELOOP;
        return -1;
      }
      /* A ".." whose parent no name tells, followed by a number
       * ("/proc/sys/../<vpid>/stat", "/tmp/../proc/<vpid>"): the kernel
       * would read that number as a system id. */
      if (!up && out[0] == '/' && UNLIKELY(dotdot_resolved(out, n, s + 2, letters))) {
        long r = resolved_dir(out, n, resolve);
        if (r < 0) return -1;
        if (r > 0) up = parent_of(out, (size_t)r), named = 1;
      }
      if (up) {
        canon = named ? up : 0;
        n = up;
        s += s[2] ? 3 : 2;
        continue;
      }
      kept = 1;
    }
    if (n == PATH_MAX - 1) return 0;
    out[n++] = *s++;
  }
  out[n] = '\0';
  return 1;
}

/* proc_path of a path plain_path gave (or one with nothing to take out). */
static const char *proc_path_plain(const char *path, char buf[PATH_MAX]) {
  if (strncmp(path, "/proc/", 6) != 0) return path;
  const char *p = path + 6;
  pid_t vpid, vtid = 0, stid = 0;
  /* "/proc/self/task/<vtid>": the caller's own process, one of its
   * threads by the TID gettid gave it. A number the table does not know
   * goes through as it is: a listing we do not see (preload_dents.c)
   * gives system TIDs. */
  if (strncmp(p, "self/task/", 10) == 0) {
    const char *q = p + 10;
    if (!parse_pid(&q, &vtid) || !v2s_pid(vtid, &stid)) return path;
    return put_proc_path(buf, 0, stid, q);
  }
  const char *q = p;
  if (!parse_pid(&q, &vpid)) return path;
  return pid_rest(p, buf, 1);
}

/* In absolute `plain` (no "." component, no repeated slash), the last
 * "/proc/..." whose directory is "/" by the letters before it (each ".."
 * taking one name off, none above "/"), as a pointer into plain; NULL
 * when there is none. */
const char *lexical_proc(const char *plain) {
  const char *found = NULL;
  int depth = 0;
  for (const char *c = plain + 1; *c;) {
    const char *e = c;
    while (*e && *e != '/') e++;
    if (e - c == 2 && c[0] == '.' && c[1] == '.') depth -= depth > 0;
    else if (!depth && e - c == 4 && !memcmp(c, "proc", 4) && *e == '/') found = c - 1, depth++;
    else depth++;
    c = *e ? e + 1 : e;
  }
  return found;
}

/* A reading that goes on from another path (/dev/fd/.. as
 * /proc/self/fd/.., "/tmp/../proc/<n>" as /proc/<n>, by the rules'
 * letters or where the directory is our /proc) is a round of a loop in
 * proc_path_unplain, with no frame of its own. The links those rounds
 * follow (/dev/fd, a process's root, cwd or fd/<n>) are counted:
 * PROC_ROUNDS of them, as the kernel bounds the links it follows, then
 * ELOOP; a round that follows none is shorter. Nothing reads itself
 * again in a frame of its own: the deepest reading is the wrapper's
 * buffer, one plain copy and resolved_dir's (about 13 KB; a thread's
 * stack of 16 KB, review r456 F4). */
enum { PROC_ROUNDS = 40 };

static int climbs_out(const char *rest);
static NOINLINE const char *proc_path_unplain(const char *path, char buf[PATH_MAX], int letters, int resolve);

/* What the directory through an anchor in absolute `plain`
 * (plain[0..dlen), ending "proc/" or "../": next_proc_anchor) is: 0 not
 * this process's /proc (by device and inode: another procfs mount, a
 * tree's own "proc", an ordinary directory, gone); 1 our /proc, whose
 * parent there is "/" (so the path reads from "/proc/" as from "/": the
 * same walk); 2 our /proc, bound elsewhere. Asked in buf (free here): a
 * few stats, no descriptor. */
static NOINLINE int proc_anchor_kind(const char *plain, size_t dlen, char buf[PATH_MAX]) {
  struct stat d, want;
  memcpy(buf, plain, dlen);
  buf[dlen] = '\0';
  if (SYS4(newfstatat, AT_FDCWD, buf, &d, AT_NO_AUTOMOUNT) < 0 || SYS4(newfstatat, AT_FDCWD, "/proc", &want, AT_NO_AUTOMOUNT) < 0 ||
      d.st_dev != want.st_dev || d.st_ino != want.st_ino)
    return 0;
  if (dlen + 3 > PATH_MAX) return 2;
  memcpy(buf + dlen, "..", 3);
  if (SYS4(newfstatat, AT_FDCWD, buf, &d, AT_NO_AUTOMOUNT) < 0 || SYS4(newfstatat, AT_FDCWD, "/", &want, AT_NO_AUTOMOUNT) < 0 ||
      d.st_dev != want.st_dev || d.st_ino != want.st_ino)
    return 2;
  return 1;
}

/* In plain `plain` (not "/dev/fd/..." itself), the "/dev/fd/.." after a
 * kept ".." ("/tmp/../dev/fd/../../<vpid>", "/dev/../dev/fd/..": r432
 * N7) whose directory through "fd" is this process's /proc/self/fd by
 * device and inode (the kernel's walk of it ends there: the parent is
 * /proc/self): a pointer to what follows that "..", "" or "/...". NULL
 * when there is none. Two stats for each such "/dev/fd/.." (a few, in
 * paths already hooked by their "/dev/", "/fd/" and ".."), in buf (free
 * here) and a frame of their own. */
static NOINLINE const char *dev_fd_kept(const char *plain, char buf[PATH_MAX]) {
  struct stat d, want;
  int asked = 0;
  for (const char *c = strstr(plain + 1, "/dev/fd/.."); c; c = strstr(c + 1, "/dev/fd/..")) {
    if (c[10] != '/' && c[10]) continue;
    size_t dlen = (size_t)(c + 7 - plain); /* through "fd" */
    memcpy(buf, plain, dlen);
    buf[dlen] = '\0';
    if (!asked && SYS4(newfstatat, AT_FDCWD, "/proc/self/fd", &want, AT_NO_AUTOMOUNT) < 0) return NULL;
    asked = 1;
    if (SYS4(newfstatat, AT_FDCWD, buf, &d, AT_NO_AUTOMOUNT) == 0 && d.st_dev == want.st_dev && d.st_ino == want.st_ino) return c + 10;
  }
  return NULL;
}

/* proc_path of a path with repeated slashes, "." or ".." components: of
 * the plain path, the answer the rewritten one, or else the plain path
 * itself (in buf). Never `path` (but one of PATH_MAX bytes or more, the
 * kernel's to refuse): a ".." taken out lexically after a
 * virtual id ("/proc/<vpid>/../self/stat", "/proc/self/task/<vtid>/..")
 * leaves a plain path with no id to rewrite, while the original still
 * names the virtual id, which the kernel would look up as a system one
 * (no such process, or an unrelated one). Its own frame: the plain copy
 * costs the stack only here (a signal handler on a small alternate stack
 * may open a /proc path). The plain path may still hold a ".." (one kept
 * for the kernel): not made plain again. `letters`: the reading the path
 * rules match (a ".." outside /proc taken by its letters, nothing looked
 * up on the real side: r388 H1); else the kernel's, what it is handed
 * (r416 F3: "/tmp/x/lnk/../../../proc/2" through a link is not /proc to
 * the kernel). A reading that goes on from another path ("/dev/fd/..",
 * the letters' "/proc/...") goes round again with it in buf: one plain
 * copy, whatever the depth. */
static NOINLINE const char *proc_path_unplain(const char *path, char buf[PATH_MAX], int letters, int resolve) {
  /* Of PATH_MAX bytes or more: as it is, for the kernel's ENAMETOOLONG,
   * not a shorter plain path opened (review r456 F8). */
  if (UNLIKELY(strnlen(path, PATH_MAX) == PATH_MAX)) return path;
  char plain[PATH_MAX];
  const char *src = path;
  /* The links the rounds followed (as the kernel would): PROC_ROUNDS,
   * then ELOOP. A round that follows none is shorter than the one
   * before (a kept ".." and a name at least dropped before "proc/"), so
   * they end by themselves (r432 N5: 41 returns by "/tmp/../proc/1/.."
   * to an ordinary directory failed ELOOP). */
  for (int links = 0;;) {
    if (links > PROC_ROUNDS) {
      errno = ELOOP;
      return NULL;
    }
    int made = plain_path(src, plain, letters, resolve);
    if (made < 0) return NULL;
    /* Too long once plain (a directory's name the kernel gave is longer
     * than its spelling): the path as written would fit, and its number
     * be read as a system id (r416 F2). */
    if (!made) {
      errno = ENAMETOOLONG;
      return NULL;
    }
    /* "/dev/fd/.." however it was spelled ("//dev/fd", "/dev/./fd",
     * "/dev/fd/./..": r416 F1): "/proc/self" (the parent of
     * /proc/self/fd, by its name) when /dev/fd is the system's link to
     * /proc/self/fd (one readlink, for such paths only; any other /dev/fd
     * is the kernel's to read). The same length as "/dev/fd/..": a path
     * the kernel takes still fits (r432 N4: "/dev/fd/../../../<file>" of
     * 4094 bytes is an ordinary file), and the next round is shorter. */
    if (UNLIKELY(dev_fd_up(plain))) {
      char link[16];
      if (SYS4(readlinkat, AT_FDCWD, "/dev/fd", link, sizeof link) == 13 && !memcmp(link, "/proc/self/fd", 13)) {
        /* openat2 RESOLVE_NO_SYMLINKS: the kernel stops at /dev/fd (r432
         * N6); its walk asked, for its own errno. */
        int refused = UNLIKELY(resolve) ? dev_fd_refused("/dev/fd/..", resolve) : 0;
        if (refused) {
          errno = refused;
          return NULL;
        }
        memcpy(buf, "/proc/self", 10);
        strcpy(buf + 10, plain + 10); /* "" or "/...": what follows "/dev/fd/.." */
        src = buf;
        links += 2; /* /dev/fd and /proc/self */
        continue;
      }
    }
    /* "/dev/fd/.." after a kept "..": "/proc/self" the same, once the
     * walk to it is this process's fd directory (r432 N7). No longer
     * than plain: the prefix is longer than "/proc/self". The kernel's
     * reading only: the rules read a ".." outside /proc by its letters,
     * nothing looked up (r388 H1). */
    if (!letters && UNLIKELY(strncmp(plain, "/proc/", 6) != 0 && strstr(plain + 1, "/dev/fd/..") != NULL)) {
      const char *after = dev_fd_kept(plain, buf);
      if (after) {
        if (UNLIKELY(resolve)) {
          size_t dlen = (size_t)(after - plain);
          memcpy(buf, plain, dlen);
          buf[dlen] = '\0';
          int refused = dev_fd_refused(buf, resolve);
          if (refused) {
            errno = refused;
            return NULL;
          }
        }
        memcpy(buf, "/proc/self", 10);
        strcpy(buf + 10, after);
        src = buf;
        links += 2; /* /dev/fd and /proc/self */
        continue;
      }
    }
    /* A link of a process's directory followed by a number
     * ("/proc/self/root/proc/<vpid>", "/proc/self/fd/3/<vpid>",
     * "/dev/fd/3/<vpid>": r432 N1): the directory it leads to, as the
     * kernel names it (resolved_dir, as for a ".." whose parent no name
     * tells), and what follows, round again. One that cannot be said (a
     * root in another mount namespace, a process outside the
     * application) is the kernel's, as before. */
    size_t link = proc_link_ahead(plain);
    if (UNLIKELY(link)) {
      memcpy(buf, plain, link + 1); /* through its '/' */
      long r = resolved_dir(buf, link + 1, resolve);
      if (r < 0) return NULL;
      if (r > 0) {
        const char *rest = plain + link + 1;
        size_t len = strlen(rest);
        if ((size_t)r + len >= PATH_MAX) {
          errno = ENAMETOOLONG;
          return NULL;
        }
        memcpy(buf + r, rest, len + 1);
        src = buf;
        links++;
        continue;
      }
    }
    const char *r = proc_path_plain(plain, buf); /* plain, buf or NULL */
    if (!r || r == buf) return r;
    /* A ".." kept outside /proc with "proc" and a number after it
     * ("/tmp/../proc/<vpid>"), or a number right after a kept ".."
     * ("/tmp/x/lnk/../../<vpid>", lnk a link to /dev/fd: r442 F1; no name
     * tells that ".." is /proc's). The rules read it by its letters:
     * "/tmp/../proc/<vpid>" is /proc/<vpid> to them (r403 I1), and one
     * that is not /proc by its letters is theirs to match as it is (the
     * kernel's reading comes after them, when none applies). The kernel:
     * the directory through that "proc" or ".." is asked whether it is
     * /proc (next_proc_anchor; proc_rel_join). */
    if (strncmp(plain, "/proc/", 6) != 0 && UNLIKELY(rel_reaches_number(plain))) {
      if (letters) {
        const char *abs = lexical_proc(plain);
        if (!abs) break;
        strcpy(buf, abs);
        src = buf;
        continue;
      }
      /* Our /proc: "/proc/" and what follows the "proc", "..", "cwd" or
       * "fd/<n>", round again (r416 F7: no frame per return). Bound
       * elsewhere (its parent not "/"), the same while the rest stays in
       * it (the same files: no second reading with a frame of its own,
       * review r456 F4); a ".." out of it is ELOOP (what the reading
       * would take for "/" is that directory's parent: the wrong file,
       * r456 F2; the path as written hands the kernel a virtual id, F3).
       * Not our /proc: the kernel's (r416 F8: no ELOOP for a tree's own
       * "proc/2"). */
      struct proc_anchors it = {plain, NULL, NULL, 0, 0};
      const char *num; /* what follows the anchor's "proc/" or "../" */
      int kind = 0;
      while ((num = next_proc_anchor(&it)) && !(kind = proc_anchor_kind(plain, (size_t)(num - plain), buf))) {}
      if (kind == 2 && climbs_out(num)) {
        errno = ELOOP;
        return NULL;
      }
      if (kind && UNLIKELY(resolve)) {
        /* The walk to that "proc" (or "..") may follow a link of the
         * user's (to /proc/self/root/..., to /dev/fd): the kernel's, with
         * the flags. */
        size_t dlen = (size_t)(num - plain);
        memcpy(buf, plain, dlen);
        buf[dlen] = '\0';
        int refused = walk_refused(buf, resolve);
        if (refused) {
          errno = refused;
          return NULL;
        }
      }
      if (kind) {
        /* No longer than plain but for "/cwd/<n>" (an anchor of 5
         * bytes): then once, and never past PATH_MAX. */
        if (6 + strlen(num) >= PATH_MAX) {
          errno = ENAMETOOLONG;
          return NULL;
        }
        strcpy((char *)memcpy(buf, "/proc/", 6) + 6, num);
        src = buf;
        continue;
      }
    }
    break;
  }
  return strcpy(buf, plain);
}

static const char *proc_path_read(const char *path, char buf[PATH_MAX], int letters, int resolve) {
  if (!path || path[0] != '/' || !g_h) return path;
  /* A plain path outside /proc with a number after a "proc", "cwd" or
   * "fd/<n>" ("/tmp/x/selflnk/cwd/<vpid>": review r456 F1): the anchors
   * asked as for one with a "..". */
  if (UNLIKELY(path_unplain(path)) || UNLIKELY(proc_link_ahead(path)) ||
      UNLIKELY(strncmp(path, "/proc/", 6) != 0 && abs_anchor_named(path) && rel_reaches_number(path)))
    return proc_path_unplain(path, buf, letters, resolve);
  return proc_path_plain(path, buf);
}

/* Returns the path to hand to the kernel: `path` itself, or `buf` holding
 * the rewritten one; NULL with errno set when the path must fail. The
 * wrappers that use it are in preload_path.c (path_slow). */
const char *proc_path(const char *path, char buf[PATH_MAX]) {
  return proc_path_read(path, buf, 0, 0);
}

const char *proc_path_resolve(const char *path, char buf[PATH_MAX], int resolve) {
  return proc_path_read(path, buf, 0, resolve);
}

const char *proc_path_letters(const char *path, char buf[PATH_MAX]) {
  return proc_path_read(path, buf, 1, 0);
}

/* --- Relative to a descriptor of /proc -------------------------------------
 *
 * openat(procfd, "<vpid>/status") (htop, systemd and procps-ng's newer
 * library open a process's directory by the name a listing gave, then
 * its files relative to it): the listing gave the virtual id
 * (preload_dents.c), the kernel wants the system one. Which directory the
 * descriptor is, is read from its link (/proc/self/fd/N), only when the
 * path starts with a number or "task/" (proc_at_hooked): "/proc" (then
 * "<vpid>[/task/<vtid>]<rest>"), "/proc/<pid>/task" ("<vtid><rest>") or
 * "/proc/<pid>" ("task/<vtid><rest>"). Any other directory: the path as
 * it is. A virtual id the tables do not know: ENOENT, as above.
 *
 * The working directory is such a directory for a relative path with
 * AT_FDCWD or without a directory argument (chdir("/proc"), then
 * open("<vpid>/status")): its link is /proc/thread-self/cwd, read only
 * while cwd_in_proc() says it is inside /proc. */

/* The directory `dirfd` names (AT_FDCWD: the calling thread's working
 * directory) into dir[size], terminated: its length, or -1 when it is not
 * /proc or inside it, or does not fit. A descriptor is asked its file
 * system first: reading its link costs several times a stat call, and
 * most directories a name starting with a digit is looked up under are
 * not /proc. */
long proc_dir_link(int dirfd, char *dir, size_t size) {
  char link[32] = "/proc/thread-self/cwd";
  if (dirfd != AT_FDCWD) {
    struct statfs sf;
    if (SYS2(fstatfs, dirfd, &sf) != 0 || sf.f_type != PROC_SUPER_MAGIC) return -1;
    *put_decimal((char *)memcpy(link, "/proc/self/fd/", 14) + 14, (unsigned long)dirfd) = '\0';
  }
  long n = SYS4(readlinkat, AT_FDCWD, link, dir, size - 1);
  if (n < 5 || n >= (long)size - 1 || memcmp(dir, "/proc", 5) || (n > 5 && dir[5] != '/')) return -1;
  dir[n] = '\0';
  return n;
}

/* Whether the working directory is inside /proc: 1, 0, or -1 (not known:
 * at the start, and after each chdir or fchdir of ours, cwd_moved()). A
 * thread that left the shared working directory (unshare(CLONE_FS)) and
 * moves its own shares this with the others: at worst a stale 0 there,
 * until the next move. */
int g_cwd_in_proc = -1;

int cwd_in_proc_slow(void) {
  char dir[64];
  int in = proc_dir_link(AT_FDCWD, dir, sizeof dir) >= 0;
  g_cwd_in_proc = in;
  return in;
}

int proc_dir_kind(int dirfd) {
  char dir[64];
  long n = proc_dir_link(dirfd, dir, sizeof dir);
  if (n < 0) return PROC_DIR_NONE;
  if (n == 5) return PROC_DIR_ROOT;
  /* "/proc/<digits>" or "/proc/<digits>/task" */
  const char *d = dir + 5;
  pid_t ignored;
  if (*d++ != '/' || !parse_pid(&d, &ignored)) return PROC_DIR_INSIDE;
  if (!*d) return PROC_DIR_PROCESS;
  return strcmp(d, "/task") ? PROC_DIR_INSIDE : PROC_DIR_TASKS;
}

const char *proc_at_path(int kind, const char *path, char buf[PATH_MAX]) {
  const char *q = path;
  pid_t vtid, stid;
  if (kind == PROC_DIR_ROOT) { /* "<vpid>[/task/<vtid>]<rest>" */
    return parse_pid(&q, &vtid) ? pid_rest(path, buf, 0) : path; /* "12abc": as it is */
  } else if (kind == PROC_DIR_TASKS) {
    if (!parse_pid(&q, &vtid)) return path;
  } else if (kind == PROC_DIR_PROCESS && !strncmp(path, "task/", 5)) {
    q += 5;
    if (!parse_pid(&q, &vtid)) return path;
  } else {
    return path;
  }
  if (!vtid) return path; /* task 0: for the kernel to refuse */
  if (!v2s_pid(vtid, &stid)) {
    errno = ENOENT;
    return NULL;
  }
  if (strlen(q) + 20 >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  char *o = buf;
  if (path[0] == 't') o = (char *)memcpy(o, "task/", 5) + 5;
  strcpy(put_decimal(o, (unsigned long)stid), q);
  return buf;
}

const char *proc_at_join(int dirfd, const char *path, char buf[PATH_MAX], int resolve) {
  char dir[64];
  long n = proc_dir_link(dirfd, dir, sizeof dir);
  if (n < 0) return path;
  /* "/proc/<spid>...": the absolute logic takes the virtual ids. A
   * process outside the application has none: its path as it is. */
  pid_t spid, vpid;
  if (n > 6 && decimal_at(dir + 6, (size_t)n - 6, &spid) && !appshot_s2v(g_h, APPSHOT_PID, spid, &vpid)) return path;
  n = (long)proc_answer_to_virtual(dir, (size_t)n, sizeof dir - 1);
  size_t len = strlen(path);
  if ((size_t)n + 1 + len >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  memcpy(buf, dir, (size_t)n);
  buf[n] = '/';
  memcpy(buf + n + 1, path, len + 1);
  /* No "." or ".." after all (a hidden name), and no link followed by a
   * number ("self/root/proc/<vpid>": r432 N1): the relative logic. */
  if (!path_unplain(buf) && !proc_link_ahead(buf)) return path;
  return proc_path_unplain(buf, buf, 0, resolve);
}

/* Whether `rest`, read by its letters from a directory, goes above it (a
 * ".." there). Names only. */
static int climbs_out(const char *rest) {
  int depth = 0;
  for (const char *c = rest; *c;) {
    const char *e = c;
    while (*e && *e != '/') e++;
    size_t len = (size_t)(e - c);
    if (len == 2 && c[0] == '.' && c[1] == '.') {
      if (!depth) return 1;
      depth--;
    } else if (len && !(len == 1 && c[0] == '.')) {
      depth++;
    }
    c = *e ? e + 1 : e;
  }
  return 0;
}

/* Whether the parent of the directory buf[0..dlen) (relative to dirfd,
 * ending '/') is "/" (device and inode). buf[dlen..dlen+3) is written:
 * "..". */
static int parent_is_root(int dirfd, char buf[PATH_MAX], size_t dlen) {
  struct stat d, root;
  if (dlen + 3 > PATH_MAX) return 0;
  memcpy(buf + dlen, "..", 3);
  return SYS4(newfstatat, dirfd, buf, &d, AT_NO_AUTOMOUNT) == 0 && SYS4(newfstatat, AT_FDCWD, "/", &root, AT_NO_AUTOMOUNT) == 0 &&
         d.st_dev == root.st_dev && d.st_ino == root.st_ino;
}

/* The directory through an anchor (next_proc_anchor: a "proc" component,
 * or a ".." before a number) is stat'ed relative to dirfd (no
 * descriptor needed: no EMFILE) and must be this process's /proc itself
 * (its device and inode): another procfs mount (another PID
 * namespace's under a container's root, or, since Linux 5.8 each mount
 * having a superblock of its own, a second mount of ours: r403 L3), or a
 * build tree's "proc/1", stays as it is. The
 * path stays relative, to the same dirfd, with only the number made the
 * system's: the kernel walks the same directories (openat2's
 * RESOLVE_BENEATH and NO_XDEV still hold), no link's text is taken for a
 * path (a directory outside our root, another mount namespace: r388
 * M3), and no absolute name of a deep directory makes it too long. */
const char *proc_rel_join(int dirfd, const char *path, char buf[PATH_MAX], int resolve, int in_proc) {
  if ((dirfd < 0 && dirfd != AT_FDCWD) || strlen(path) >= PATH_MAX) return path; /* the kernel says ENAMETOOLONG */
  struct proc_anchors it = {path, NULL, NULL, 0, 0};
  struct stat d, proc;
  int asked = 0;
  const char *num; /* what follows the anchor's "proc/" or "../" */
  size_t dlen;
  for (;;) {
    if (!(num = next_proc_anchor(&it))) return path;
    dlen = (size_t)(num - path);
    memcpy(buf, path, dlen);
    buf[dlen] = '\0';
    /* gone, not a directory, no search right: the kernel says so too */
    if (SYS4(newfstatat, dirfd, buf, &d, AT_NO_AUTOMOUNT) < 0) continue;
    if (!asked && SYS4(newfstatat, AT_FDCWD, "/proc", &proc, AT_NO_AUTOMOUNT) < 0) return path;
    asked = 1;
    if (d.st_dev == proc.st_dev && d.st_ino == proc.st_ino) break;
  }
  /* Under a directory of /proc a number before the anchor is a virtual
   * id, which the stat (and the kernel, handed the prefix) read as a
   * system one: that path is proc_at_join's. */
  if (in_proc)
    for (const char *c = buf; c < buf + dlen; c++)
      if ((c == buf || c[-1] == '/') && *c >= '0' && *c <= '9') return path;
  size_t rest = strlen(num);
  /* "proc/" made "/proc/" no longer fits: the path as written would, and
   * its number be read as a system id (r416 F2). */
  if (6 + rest >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  /* A ".." out of that /proc ("proc/1/../../etc", and back in:
   * "proc/1/../../tmp/../proc/<vpid>"): the reading below takes /proc's
   * parent for "/", true only where it is (two stats, for such paths
   * only). Our /proc bound elsewhere ("bp/self/../2/../../proc/2", bp a
   * bind of /proc: review r456 F2, F3): neither the reading (the wrong
   * file) nor the path as written (a virtual id the kernel reads as a
   * system one) is right: ELOOP, as the absolute reading gives. */
  if (UNLIKELY(climbs_out(num)) && !parent_is_root(dirfd, buf, dlen)) {
    errno = ELOOP;
    return NULL;
  }
  /* "/proc/<num>" read in buf itself (proc_path_unplain allows it; its
   * plain copy is the one PATH_MAX frame: a thread's stack of 16 KB,
   * review r456 F4). */
  memcpy(buf, "/proc/", 6);
  memcpy(buf + 6, num, rest + 1);
  const char *r = proc_path_unplain(buf, buf, 0, resolve);
  if (!r) return NULL;
  if (strncmp(r, "/proc/", 6) != 0) {
    /* Out of /proc by a link of a process's directory ("self/root/etc"):
     * r is read from "/", said relative to the directory's parent when
     * that is "/" (as above). */
    size_t tail = strlen(r + 1);
    if (dlen + 3 + tail >= PATH_MAX) { /* system ids may be longer: as above */
      errno = ENAMETOOLONG;
      return NULL;
    }
    memmove(buf + dlen + 3, r + 1, tail + 1);
    memcpy(buf, path, dlen);
    memcpy(buf + dlen, "..", 3);
    if (!parent_is_root(dirfd, buf, dlen)) {
      errno = ELOOP;
      return NULL;
    }
    buf[dlen + 2] = '/';
    return buf;
  }
  if (!strcmp(r + 6, num)) return path; /* nothing rewritten */
  size_t tail = strlen(r + 6);
  if (dlen + tail >= PATH_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  memmove(buf + dlen, r + 6, tail + 1);
  memcpy(buf, path, dlen);
  return buf;
}

/* --- Answers that name a process by its system id --------------------------
 *
 * The kernel answers in system ids too: the link /proc/self is "<spid>",
 * /proc/thread-self "<spid>/task/<stid>", and a descriptor, working
 * directory or root inside /proc/<pid> links to "/proc/<spid>/...". So
 * does getcwd() there, and realpath() of such a path. The application
 * would take those numbers for virtual ones (and open another process's
 * /proc, or none) once a restore has given it new system ids: they are
 * made the virtual ones it knows. A number the tables do not know (a
 * process outside the application) is left as it is. */

/* The decimal at s[0..len), ending at len or a '/': its length, 0 if none. */
static size_t decimal_at(const char *s, size_t len, pid_t *out) {
  size_t i = 0;
  long v = 0;
  for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
    v = v * 10 + (s[i] - '0');
    if (v > INT32_MAX) return 0;
  }
  if (i == 0 || (i < len && s[i] != '/')) return 0;
  *out = (pid_t)v;
  return i;
}

/* Rewrites "<spid>[/task/<stid>]<rest>" at s (len bytes, not terminated;
 * room for cap) with the virtual ids. Returns the new length, at most cap:
 * an answer that grows past it is cut, as readlink cuts one. */
static size_t ids_to_virtual(char *s, size_t len, size_t cap) {
  pid_t spid, stid = 0, vpid, vtid = 0;
  size_t n = decimal_at(s, len, &spid), old = n;
  if (!n || !appshot_s2v(g_h, APPSHOT_PID, spid, &vpid)) return len;
  if (len - n > 6 && !memcmp(s + n, "/task/", 6)) {
    size_t t = decimal_at(s + n + 6, len - n - 6, &stid);
    /* The caller's own thread may not be in the tables yet (it never
     * asked its TID): mapped as gettid() would map it. */
    if (t && (appshot_s2v(g_h, APPSHOT_PID, stid, &vtid) || (stid == (pid_t)SYS0(gettid) && (vtid = self_vtid()))))
      old = n + 6 + t;
  }
  char head[40]; /* "<vpid>/task/<vtid>": at most 10 + 6 + 10 */
  char *d = put_decimal(head, (unsigned long)vpid);
  if (vtid) d = put_decimal((char *)memcpy(d, "/task/", 6) + 6, (unsigned long)vtid);
  size_t h = (size_t)(d - head), rest = len - old;
  if (h > cap) h = cap;
  if (rest > cap - h) rest = cap - h;
  memmove(s + h, s + old, rest);
  memcpy(s, head, h);
  return h + rest;
}

size_t proc_answer_to_virtual(char *s, size_t len, size_t cap) {
  if (!g_h || len < 7 || memcmp(s, "/proc/", 6) || s[6] < '0' || s[6] > '9') return len;
  return 6 + ids_to_virtual(s + 6, len - 6, cap - 6);
}

/* Whether `name` (a path's tail, terminated) is one of the kernel's links
 * that may point into /proc: "cwd", "root", "exe", "fd/<n>" or
 * "map_files/<range>" (or, under an fd directory, "<n>"), with nothing
 * after it. Past one of those a path goes on through the link (to a
 * user's symlink under /proc/self/root/...), whose target is the user's
 * text, never rewritten. */
static int all_digits(const char *s) {
  if (!*s) return 0;
  for (; *s; s++)
    if (*s < '0' || *s > '9') return 0;
  return 1;
}

static int kernel_link_name(const char *name, int in_fd_dir) {
  const char *slash = strchr(name, '/');
  if (!slash) {
    if (in_fd_dir) return all_digits(name);
    return !strcmp(name, "cwd") || !strcmp(name, "root") || !strcmp(name, "exe");
  }
  const char *rest = slash + 1;
  if (strchr(rest, '/') || !*rest) return 0;
  if (slash - name == 2 && !memcmp(name, "fd", 2)) return all_digits(rest);
  return slash - name == 9 && !memcmp(name, "map_files", 9);
}

/* The link `path` names relative to /proc's own directory (what follows
 * "/proc/"): "<pid|self|thread-self>[/task/<tid>]/<kernel link>". */
static int kernel_link_under_proc(const char *p) {
  if (!strncmp(p, "self/", 5)) p += 5;
  else if (!strncmp(p, "thread-self/", 12)) p += 12;
  else {
    pid_t ignored;
    if (!parse_pid(&p, &ignored) || *p++ != '/') return 0;
  }
  if (!strncmp(p, "task/", 5)) {
    pid_t ignored;
    p += 5;
    if (!parse_pid(&p, &ignored) || *p++ != '/') return 0;
  }
  return kernel_link_name(p, 0);
}

/* The same for a path relative to dirfd (AT_FDCWD: the working
 * directory), by the directory's link. */
static int kernel_link_at(int dirfd, const char *path) {
  char dir[64];
  long n = proc_dir_link(dirfd, dir, sizeof dir);
  if (n < 0) return 0;
  if (n == 5) return kernel_link_under_proc(path); /* "/proc" */
  /* "/proc/<pid>[/task/<tid>][/fd]" */
  int fd_dir = n > 8 && !memcmp(dir + n - 3, "/fd", 3);
  return kernel_link_name(path, fd_dir);
}

/* Whether the link `path` (under dirfd, itself, not followed) lives on a
 * proc file system: its answer is then the kernel's own text, whatever
 * name reached it. The checks by name below know the plain names only,
 * and a ".." can reach the same links by others the kernel resolves
 * ("../proc/self" under a descriptor of /proc, "/proc/1/../self",
 * "/tmp/x/../../proc/thread-self"), as can a directory symlinked to /proc
 * or a second mount of it; normalising the name lexically would be wrong
 * after a symlink (/proc/self/cwd/..), and resolving it as the kernel does
 * means walking every component. Asking the link's file system is exact
 * and one descriptor for an instant (O_PATH | O_NOFOLLOW: nothing opened
 * through it, and fstatfs answers one since Linux 3.12). Asked only of an
 * answer that looks like ids from a name the checks did not know, so
 * never on the common paths. Looked up as the caller spelled it: a
 * virtual PID inside the name reaches the system's process of that
 * number, on the same file system if it exists (its type is all that is
 * asked); if none does, the answer stays the kernel's. */
static int link_on_procfs(int dirfd, const char *path) {
  long fd = SYS4(openat, dirfd, path, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
  if (fd < 0) return 0;
  struct statfs sf;
  int on = SYS2(fstatfs, fd, &sf) == 0 && sf.f_type == PROC_SUPER_MAGIC;
  SYS1(close, fd);
  return on;
}

/* Whether `s` (len bytes) begins with a PID the tables know, followed by
 * '/' or its end: what the rewrites below would change. Checked in
 * memory before link_on_procfs asks the file system (a link whose text
 * merely starts with a digit, as lock files' do, cost an openat, fstatfs
 * and close each: review 243 L4). */
static int known_pid_at(const char *s, size_t len) {
  pid_t spid, vpid;
  return decimal_at(s, len, &spid) && appshot_s2v(g_h, APPSHOT_PID, spid, &vpid);
}

long proc_link_answer(int dirfd, const char *path, char *out, long n, size_t size) {
  if (!g_h || n <= 0 || !path) return n;
  int absolute = path[0] == '/';
  if (out[0] == '/') {
    /* A link the kernel made, to "/proc/<spid>...": under /proc, or
     * /dev/fd/<n> (a link to /proc/self/fd), or relative to a directory of
     * /proc (asked only now: few answers look like this). */
    if (n < 7 || memcmp(out, "/proc/", 6) || out[6] < '0' || out[6] > '9') return n;
    int kernels = absolute ? (!strncmp(path, "/proc/", 6) && kernel_link_under_proc(path + 6)) ||
                                 (!strncmp(path, "/dev/fd/", 8) && all_digits(path + 8))
                           : kernel_link_at(dirfd, path);
    return kernels || (known_pid_at(out + 6, (size_t)n - 6) && link_on_procfs(dirfd, path)) ? (long)proc_answer_to_virtual(out, (size_t)n, size) : n;
  }
  /* "/proc/self" and "/proc/thread-self", or "self" and "thread-self"
   * under /proc. */
  const char *name = absolute && !strncmp(path, "/proc/", 6) ? path + 6 : absolute ? NULL : path;
  if (name && (!strcmp(name, "self") || !strcmp(name, "thread-self")) && (absolute || proc_dir_kind(dirfd) == PROC_DIR_ROOT))
    return (long)ids_to_virtual(out, (size_t)n, size);
  /* Their answer ("<spid>[/task/<stid>]", the only links of /proc's whose
   * answer begins with a digit) by another name; a user's link whose
   * text is a number stays as written. */
  if (known_pid_at(out, (size_t)n) && link_on_procfs(dirfd, path)) return (long)ids_to_virtual(out, (size_t)n, size);
  return n;
}

/* --- A process's root: /proc/<vpid>/root/... -------------------------------
 *
 * A program reaches a file of another process "as that process sees it"
 * through /proc/<pid>/root (the JDK's attach finds a JVM's socket as
 * /proc/<pid>/root/tmp/.java_pid<pid>, so that it works across mount
 * namespaces). The kernel follows the root link, past every REDIR PATH
 * rule: a process of the application whose root is "/" sees /REST as the
 * rules make it, so /proc/<it>/root/REST is looked up as /REST is
 * (path_slow, only when a rule applies to /REST). */

const char *proc_root_rest(const char *path, char link[PROC_ROOT_LINK]) {
  if (strncmp(path, "/proc/", 6)) return NULL;
  const char *p = path + 6;
  pid_t vpid, spid;
  if (!strncmp(p, "self/", 5)) {
    p += 5;
    strcpy(link, "/proc/self/root");
  } else if (!strncmp(p, "thread-self/", 12)) {
    p += 12;
    strcpy(link, "/proc/thread-self/root");
  } else {
    /* Only a process the tables know: the application's own. */
    if (!parse_pid(&p, &vpid) || *p++ != '/' || !vpid || !v2s_pid(vpid, &spid)) return NULL;
    strcpy(put_decimal((char *)memcpy(link, "/proc/", 6) + 6, (unsigned long)spid), "/root");
  }
  if (strncmp(p, "root/", 5)) return NULL;
  return p + 4;
}
