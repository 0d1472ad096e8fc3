/* A path operation with the filesystem identity of a process of the image.
 *
 * A restore acts on names an image gives (a socket's file, a directory it
 * was bound in); a root restorer doing so with its own credentials would
 * follow a symlink planted in a directory the application could write to
 * a place only root may write, and make or change files there that the
 * application never could have. The kernel decides a path operation by
 * the calling *thread's* fsuid, fsgid, supplementary groups and effective
 * capabilities, so a thread of our own takes the image process's ones and
 * does the operation: the kernel then grants exactly what it granted the
 * application, and the same errors (EACCES) say no.
 *
 * Raw system calls, never glibc's setgroups/setfsuid wrappers: glibc runs
 * setgroups (like setuid) on every thread of the process (its SETXID
 * broadcast), which would change the credentials of the engine itself. The
 * thread ends with its call, so nothing is to be put back.
 *
 * An unprivileged restorer needs nothing it lacks: the restore refuses an
 * image whose uids, gids or groups it does not hold (creds.ts,
 * credentialRefusal), so fsuid and fsgid are ids it holds (setfsuid and
 * setfsgid take those without a capability), the groups are its own (left
 * as they are), and lowering the effective set needs no capability. */
#define _GNU_SOURCE
#include "fsident.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct call {
  const struct fsident* who;
  const char* dir;
  int (*op)(void*);
  void* arg;
  int rc;
  int strict;      /* names resolved without following symlinks */
  int not_taken;   /* the identity itself could not be taken */
};

/* Whether the operation running on this thread is a retry as another
 * identity than its holder's: its names are then resolved without
 * following a symlink (fsident_open, fsident_plain_path). A symlink the
 * holder's user planted (in a directory of theirs, after the snapshot)
 * is followed with that user's rights only, never with a root master's
 * (review29 H2). */
static __thread int strict_names;

int fsident_strict(void) { return strict_names; }

/* The open_how open(2) would make of `flags` and `mode`: open(2) drops
 * the bits it does not know, whatever O_PATH does not take (O_NONBLOCK,
 * O_NOCTTY, O_APPEND...) and a mode where nothing is made; openat2
 * refuses each with EINVAL. As open(2) does, then: a descriptor's flags
 * as the image recorded them (fdinfo's, O_LARGEFILE among them) open as
 * they did, and a second identity's look at a name (an O_PATH probe) does
 * not fail where the first's was refused (apache2's workers, which hold
 * the error log root opened in a directory they cannot search). */
#define KERNEL_O_LARGEFILE 0100000 /* glibc's is 0 on x86-64 */
#define KERNEL_O_TMPFILE_BIT 020000000
#define OPEN_FLAGS_KNOWN                                                                                                      \
  (O_ACCMODE | O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_APPEND | O_NONBLOCK | O_SYNC | O_DSYNC | O_ASYNC | O_DIRECT | \
   KERNEL_O_LARGEFILE | O_DIRECTORY | O_NOFOLLOW | O_NOATIME | O_CLOEXEC | O_PATH | KERNEL_O_TMPFILE_BIT)
static struct open_how open_how_of(int flags, unsigned mode, uint64_t resolve) {
  uint64_t f = (uint64_t)(unsigned)flags & OPEN_FLAGS_KNOWN;
  if (f & O_PATH) f &= O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
  int makes = (f & O_CREAT) || (f & KERNEL_O_TMPFILE_BIT);
  return (struct open_how){.flags = f, .mode = makes ? mode & 07777 : 0, .resolve = resolve};
}

static int openat2_at(int dir, const char* path, const struct open_how* how) {
  return (int)syscall(SYS_openat2, dir, path, how, sizeof *how);
}

/* Every open of a name an image gives, or one in a directory the
 * application may change, goes through here: never through a /proc magic
 * link (RESOLVE_NO_MAGICLINKS: /proc/PID/fd/N, cwd, root, exe, map_files,
 * ns; /proc/self/... and /dev/fd/... lead to them), met anywhere on the
 * way, at the end or through a symlink that names one. The kernel jumps
 * through such a link to the very file a process holds, without walking
 * a name: past the directories' permissions, and, from a thread of ours,
 * to the restorer's own descriptors (the resident engine's open files,
 * its memfds, its tables: the proc check is ptrace_may_access, which a
 * thread of the process itself always passes, whatever identity it
 * took). A snapshot never records such a name (the kernel shows what a
 * link leads to, never the link), so an image or a symlink planted since
 * is all that can name one. The open fails with ELOOP, as the kernel
 * answers it (fsident_through_magic_link tells it from a loop).
 *
 * A caller that means a magic link (ours: /proc/self/fd/N of a descriptor
 * of its own) uses open(2) or the descriptor itself: fsident_openat, a
 * name beneath a directory we opened as the process (paths.ts copies a
 * directory's entries so), never a /proc/self/fd/N/name to this.
 *
 * openat2 is Linux 5.6; a restore already needs 5.8 (faccessat2, ExecOp
 * in addon_fsident.cc), so there is no fallback: on an older kernel the
 * open fails with ENOSYS rather than follow a magic link (a check after
 * the open could not tell the engine's own file from the application's:
 * both are plain files). */
int fsident_open(const char* path, int flags, unsigned mode) { return fsident_openat(AT_FDCWD, path, flags, mode); }

/* Whether openat2 itself is refused here, whatever it is asked: 0 (it
 * works), -EPERM or -ENOSYS, as a harmless call answers (O_PATH of "/",
 * which no permission, security module or Landlock rule refuses). A
 * seccomp filter that answers openat2 with EPERM (Docker's default
 * profile before 20.10, some sandboxes) would otherwise read as every
 * identity's refusal of every name, tried as each in turn and told as a
 * credential the process lacks (r375 L1); ENOSYS is a kernel before 5.6,
 * or a filter that answers so. Asked once, at the first such error: the
 * answer holds for the process (a filter is inherited by every thread
 * made after it, and this engine installs none). */
static int openat2_refused = 1; /* 1: not asked yet */
static int faccessat2_refused = 1;

/* `*known`, or what `ask` answers (0, -EPERM, -ENOSYS; 1: no answer, an
 * EMFILE say, asked again next time), kept. */
static int refused_answer(int* known, int (*ask)(void)) {
  int k = __atomic_load_n(known, __ATOMIC_ACQUIRE);
  if (k != 1) return k;
  int rc = ask();
  if (rc == 1) return 0;
  __atomic_store_n(known, rc, __ATOMIC_RELEASE);
  return rc;
}

static int ask_openat2(void) {
  struct open_how how = open_how_of(O_PATH | O_CLOEXEC, 0, 0);
  int fd = openat2_at(AT_FDCWD, "/", &how);
  if (fd >= 0) {
    close(fd);
    return 0;
  }
  return errno == EPERM || errno == ENOSYS ? -errno : 1;
}

/* faccessat2's F_OK of "/": a walk of "/" alone, which no credential
 * refuses (F_OK asks no permission of the file). */
static int ask_faccessat2(void) {
  if (syscall(SYS_faccessat2, AT_FDCWD, "/", F_OK, AT_EACCESS) == 0) return 0;
  return errno == EPERM || errno == ENOSYS ? -errno : 1;
}

int fsident_openat2_refused(void) { return refused_answer(&openat2_refused, ask_openat2); }

/* The same of faccessat2 (Linux 5.8; addon_fsident.cc ExecOp): a filter
 * that answers it EPERM would read as every identity's refusal to run its
 * executable, ENOSYS as no answer at all (r392 F4). */
int fsident_faccessat2_refused(void) { return refused_answer(&faccessat2_refused, ask_faccessat2); }

int fsident_openat(int dir, const char* path, int flags, unsigned mode) {
  /* In a retry as another identity, no symlink at all (which covers the
   * magic ones). */
  struct open_how how = open_how_of(flags, mode, strict_names ? RESOLVE_NO_SYMLINKS : RESOLVE_NO_MAGICLINKS);
  int fd = openat2_at(dir, path, &how);
  if (fd >= 0) return fd;
  /* The name's own answer, before the probe's open (EMFILE, say) can
   * overwrite it (r392 F3). */
  int err = errno;
  /* openat2 refused as such: -ENOSYS, not a refusal of this name that
   * fsident_run would try as every other identity. */
  if ((err == EPERM || err == ENOSYS) && fsident_openat2_refused()) return -ENOSYS;
  /* A symlink on the way: refused as this identity, as the holder's was. */
  if (strict_names && err == ELOOP) return -EACCES;
  return -err;
}

/* Looked at again with O_PATH (nothing opened, no FIFO waited on), the
 * caller's O_NOFOLLOW kept: a name that fails only where magic links are
 * not followed leads through one. O_PATH|O_NOFOLLOW stops at a trailing
 * link, magic or not, rather than refuse it, so the kernel's own ELOOP
 * for a trailing symlink under O_NOFOLLOW is not taken for one. In a
 * retry as another identity every symlink is refused, magic or not
 * (fsident_open): not asked. */
int fsident_through_magic_link(int dir, const char* path, int flags) {
  if (strict_names) return 0;
  int nofollow = flags & O_NOFOLLOW;
  struct open_how plain = open_how_of(O_PATH | O_CLOEXEC | nofollow, 0, 0);
  struct open_how without = open_how_of(O_PATH | O_CLOEXEC | nofollow, 0, RESOLVE_NO_MAGICLINKS);
  int a = openat2_at(dir, path, &without);
  if (a >= 0) {
    close(a);
    return 0;
  }
  if (errno != ELOOP) return 0;
  int b = openat2_at(dir, path, &plain);
  if (b < 0) return 0;
  close(b);
  return 1;
}

int fsident_plain_path(const char* path, int final_too) {
  if (!strict_names) return 0;
  char dir[4096];
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof dir) return -ENAMETOOLONG;
  memcpy(dir, path, n + 1);
  char* slash = strrchr(dir, '/');
  const char* name = path;
  if (slash == dir) dir[1] = 0, name = path + 1;
  else if (slash) *slash = 0, name = path + (slash - dir) + 1;
  else dir[0] = '.', dir[1] = 0;
  int d = fsident_open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
  if (d < 0) return d;
  int followed = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
  struct stat a, b;
  int rc = 0;
  if (followed < 0 || fstat(d, &a) != 0 || fstat(followed, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) rc = -EACCES;
  /* The name itself: a symlink there is followed by connect(2). */
  if (!rc && final_too && fstatat(d, name, &a, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(a.st_mode)) rc = -EACCES;
  if (followed >= 0) close(followed);
  close(d);
  return rc;
}

int fsident_fdinfo_mount_id(int fd, uint64_t* id) {
  /* Our own descriptor's, by our own name for it: no name of an image's. */
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
  int info = open(path, O_RDONLY | O_CLOEXEC);
  if (info < 0) return -errno;
  /* pos, flags, mnt_id and ino come first, before any kind's own lines
   * (an epoll's or inotify's, which may be long). */
  char buf[4096];
  ssize_t n;
  do n = read(info, buf, sizeof buf - 1);
  while (n < 0 && errno == EINTR);
  int err = errno;
  close(info);
  if (n < 0) return -err;
  buf[n] = 0;
  for (const char* line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
    if (strncmp(line, "mnt_id:", 7) != 0) continue;
    const char* at = line + 7;
    while (*at == ' ' || *at == '\t') at++;
    if (*at < '0' || *at > '9') return -ENODATA;
    char* end;
    errno = 0;
    unsigned long long v = strtoull(at, &end, 10);
    if (errno || (*end != '\n' && *end != 0)) return -ENODATA;
    *id = v;
    return 0;
  }
  return -ENODATA;
}

static int cmp_u32(const void* a, const void* b) {
  uint32_t x = *(const uint32_t*)a, y = *(const uint32_t*)b;
  return x < y ? -1 : x > y;
}

int thread_groups_are(const uint32_t* groups, uint32_t ngroups) {
  long n = syscall(SYS_getgroups, 0, NULL);
  if (n < 0 || (uint32_t)n != ngroups) return 0;
  uint32_t* have = malloc(((size_t)n + 1) * sizeof *have);
  uint32_t* want = malloc(((size_t)n + 1) * sizeof *want);
  int same = 0;
  if (have && want && syscall(SYS_getgroups, n, have) == n) {
    memcpy(want, groups, (size_t)n * sizeof *want);
    qsort(have, (size_t)n, sizeof *have, cmp_u32);
    qsort(want, (size_t)n, sizeof *want, cmp_u32);
    same = memcmp(have, want, (size_t)n * sizeof *have) == 0;
  }
  free(have);
  free(want);
  return same;
}

static int groups_are(const struct fsident* who) { return thread_groups_are(who->groups, who->ngroups); }

/* This thread takes `who`'s filesystem identity, exactly, or -errno. */
static int take(const struct fsident* who) {
  if (who->ngroups > FSIDENT_MAX_GROUPS) return -EINVAL;
  /* Groups first: setgroups needs CAP_SETGID, which the capset below may
   * drop. The thread's own only (the raw call). */
  if (!groups_are(who) && syscall(SYS_setgroups, (size_t)who->ngroups, who->groups) != 0) return -errno;
  /* setfsuid/setfsgid answer the previous value, never an error: asked
   * again (an id no one has, -1, changes nothing), they tell. */
  syscall(SYS_setfsgid, who->fsgid);
  if ((uint32_t)syscall(SYS_setfsgid, -1) != who->fsgid) return -EPERM;
  /* From fsuid 0 to another, the kernel drops the file capabilities
   * from the effective set (and gives them back on the way to 0): the
   * capset after this says the last word. */
  syscall(SYS_setfsuid, who->fsuid);
  if ((uint32_t)syscall(SYS_setfsuid, -1) != who->fsuid) return -EPERM;
  struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct d[2];
  if (syscall(SYS_capget, &h, d) != 0) return -errno;
  uint64_t prm = (uint64_t)d[1].permitted << 32 | d[0].permitted;
  /* The effective set must lie in the permitted one; the image's effective
   * set is within the restorer's permitted one (credentialRefusal). */
  if (who->cap_eff & ~prm) return -EPERM;
  d[0].effective = (uint32_t)who->cap_eff;
  d[1].effective = (uint32_t)(who->cap_eff >> 32);
  if (syscall(SYS_capset, &h, d) != 0) return -errno;
  return 0;
}

static void* run(void* arg) {
  struct call* c = arg;
  int rc = 0;
  /* A working directory of this thread only: the process's (the engine's,
   * shared by every thread) stays where it is. */
  if (c->dir && *c->dir && unshare(CLONE_FS) != 0) rc = -errno;
  if (!rc && c->who) rc = take(c->who);
  if (rc) {
    c->not_taken = 1;
    c->rc = rc;
    return NULL;
  }
  strict_names = c->strict;
  /* Entered as the application would have: a directory it cannot search
   * is not entered. */
  if (c->dir && *c->dir) {
    int d = fsident_open(c->dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
    if (d < 0) rc = d;
    else {
      if (fchdir(d) != 0) rc = -errno;
      close(d);
    }
  }
  c->rc = rc ? rc : c->op(c->arg);
  strict_names = 0;
  return NULL;
}

/* Whether the calling thread has `who`'s filesystem identity already (a
 * root restore of an application that ran as root with every capability,
 * a user's of their own): then no thread is needed (one costs some 0.2 ms,
 * a restore may open thousands of files). */
static int is_current(const struct fsident* who) {
  if ((uint32_t)syscall(SYS_setfsuid, -1) != who->fsuid || (uint32_t)syscall(SYS_setfsgid, -1) != who->fsgid) return 0;
  struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct d[2];
  if (syscall(SYS_capget, &h, d) != 0) return 0;
  return ((uint64_t)d[1].effective << 32 | d[0].effective) == who->cap_eff && groups_are(who);
}

static int run_as(const struct fsident* who, const char* dir, int (*op)(void*), void* arg, int strict, int* not_taken) {
  /* Nothing to change: in this thread, as before. */
  if (!(dir && *dir) && (!who || is_current(who))) {
    strict_names = strict;
    int rc = op(arg);
    strict_names = 0;
    return rc;
  }
  struct call c = {who, dir, op, arg, 0, strict, 0};
  pthread_t t;
  int rc = pthread_create(&t, NULL, run, &c);
  if (rc != 0) return -rc;
  pthread_join(t, NULL);
  *not_taken = c.not_taken;
  return c.rc;
}

int fsident_run(const struct fsident_list* who, const char* dir, int (*op)(void*), void* arg) {
  int not_taken;
  return fsident_run_told(who, dir, op, arg, &not_taken);
}

int fsident_run_told(const struct fsident_list* who, const char* dir, int (*op)(void*), void* arg, int* not_taken) {
  *not_taken = 0;
  if (!who || who->n == 0) return run_as(NULL, dir, op, arg, 0, not_taken);
  if (who->n > FSIDENT_MAX_IDENTITIES) return -EINVAL;
  int first = 0;
  for (uint32_t i = 0; i < who->n; i++) {
    /* Every identity after the holder's resolves names strictly. */
    int rc = run_as(&who->ids[i], dir, op, arg, i > 0, not_taken);
    /* Credentials that cannot be taken exactly are no answer of the
     * kernel's to the operation: given up, not tried as another. */
    if (*not_taken) return rc;
    if (rc != -EACCES && rc != -EPERM) return rc;
    if (!first) first = rc;
  }
  return first;
}
