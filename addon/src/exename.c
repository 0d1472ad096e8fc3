/* A deleted executable's copy made at the name it had and removed from it
 * at once, so that the kernel keeps that name for it (/proc/PID/exe reads
 * "NAME (deleted)" as it did before the snapshot). The name is the
 * image's word and its directories are the application's user's, who may
 * swap one of them for a symlink at any moment (review r413 F1: a root
 * restore that looked the path up again to check and remove what it made
 * could be sent to remove a file of that name anywhere). So, as
 * sockfile.c does for socket files:
 *  - the directory is opened once, and everything after goes through that
 *    descriptor: a component swapped after it changes nothing;
 *  - all of it runs as the application's identity (fsident_run), so what
 *    is made or removed is what its own process could make or remove,
 *    whatever the restorer may (never more than the image had; and
 *    nothing refused to a root squashed on NFS that the user may do);
 *  - the removal is only of the file we made, told by its inode.
 * What no system call closes: between the check (fstatat) and the removal
 * (unlinkat), inside that one directory, another file may be renamed over
 * the name, and is then removed instead of ours (Linux has no conditional
 * unlink). Only one who may write that directory can do so, and its
 * files are then removed only as the application's identity could. */
#define _GNU_SOURCE
#include "exename.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A test point between the making and the removal (src/killpoint.ts):
 * killed there, the restore leaves the empty file at the name, which its
 * registration names (the next command removes it: exename_clear);
 * stopped there, a test may move things in the directory, then let it go
 * on. As the addon's other native points, the environment as it is now. */
#define MADE_POINT "restore: executable made at its name"

static void made_point(void) {
  /* Sent to this very thread (tgkill), which then stops (or dies) before
   * it runs another instruction: a stop sent to the process is taken by
   * its main thread, and this one went on removing the file while the
   * process showed stopped (seen in exe-deleted.test). The whole process
   * stops (or dies) all the same. */
  pid_t tid = (pid_t)syscall(SYS_gettid);
  const char* kill_at = getenv("APPSHOT_TEST_KILL_AT");
  if (kill_at && strcmp(kill_at, MADE_POINT) == 0) syscall(SYS_tgkill, getpid(), tid, SIGKILL);
  const char* stop_at = getenv("APPSHOT_TEST_STOP_AT");
  if (stop_at && strcmp(stop_at, MADE_POINT) == 0) syscall(SYS_tgkill, getpid(), tid, SIGSTOP);
}

static int same_file(const struct stat* a, const struct stat* b) {
  return a->st_ino == b->st_ino && a->st_dev == b->st_dev;
}

/* Whether `st` is what exename_make_unlinked makes and a killed restore
 * may have left: a regular file, empty, mode 0600, no other name. */
static int like_ours(const struct stat* st) {
  return S_ISREG(st->st_mode) && st->st_size == 0 && (st->st_mode & 07777) == 0600 && st->st_nlink == 1;
}

struct make_call {
  const char* dir;
  const char* name;
  /* The error of a step after the file was made: never a refusal handed
   * to fsident_run, which would try the whole operation again as the next
   * identity (and find our own file at the name). */
  int after_made;
  /* Not the program's own name but a random one beside it (deleted.ts
   * makeUnlinked): no test point there, which a test stopped at the
   * first would otherwise reach a second time. */
  int aside;
  /* Set when our file may still be at the name (its removal refused, or
   * the name could not be looked at): the caller keeps the name
   * journaled, and says the file is left there (review r425 G1, G3). */
  int left_at_name;
};

static int make_op(void* arg) {
  struct make_call* c = arg;
  int d = fsident_open(c->dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
  if (d < 0) return d;
  /* O_EXCL: never over a file, nor through a symlink at the name. */
  int f = openat(d, c->name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (f < 0) {
    int e = -errno;
    close(d);
    return e;
  }
  if (!c->aside) made_point();
  struct stat ours, there;
  int rc = 0, removed = 0;
  if (fstatat(d, c->name, &there, AT_SYMLINK_NOFOLLOW) != 0) {
    /* ENOENT: not at the name (moved, or removed by another: the nlink
     * check below tells which). Anything else (EACCES: the directory's
     * search right taken meanwhile) says nothing of where it is: that
     * error, and ours maybe still at the name (review r425 G3). */
    if (errno != ENOENT) {
      rc = -errno;
      c->left_at_name = 1;
    }
  } else if (fstat(f, &ours) != 0) {
    rc = -errno;
    c->left_at_name = 1;
  } else if (same_file(&there, &ours)) {
    /* Removed by another after the check (ENOENT: another restore's
     * release, or the user) is as good: the kernel kept that name, and
     * the nlink check below decides (review r425 G3). Refused otherwise
     * (a security module, an immutable directory: the identity made it,
     * so no mode bit refuses it): ours stays at the name, and the caller,
     * told so, makes its copy elsewhere and says why. */
    if (unlinkat(d, c->name, 0) == 0) {
      removed = 1;
    } else if (errno != ENOENT) {
      rc = -errno;
      c->left_at_name = 1;
    }
  }
  /* Still named: given another name as it was made, if we removed it
   * from ours (EMLINK; review r413 F4: a link() made meanwhile, by the
   * identity, whose file it is, or by anyone where
   * fs.protected_hardlinks=0, would keep a named file that the restore
   * then fills and gives the image's owner and mode); else moved
   * elsewhere as it was made (ESTALE). */
  if (!rc) {
    if (fstat(f, &ours) != 0) rc = -errno;
    else if (ours.st_nlink != 0) rc = removed ? -EMLINK : -ESTALE;
  }
  close(d);
  if (rc) {
    close(f);
    c->after_made = rc;
    return -ECANCELED;
  }
  return f;
}

int exename_make_unlinked(const char* dir, const char* name, const struct fsident_list* who, int aside, int* left_at_name) {
  struct make_call c = {dir, name, 0, aside, 0};
  int rc = fsident_run(who, NULL, make_op, &c);
  if (left_at_name) *left_at_name = c.left_at_name;
  return c.after_made ? c.after_made : rc;
}

static int clear_op(void* arg) {
  const struct make_call* c = arg;
  int d = fsident_open(c->dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
  if (d < 0) return d == -ENOENT ? 0 : d;
  struct stat st;
  int rc = 0;
  if (fstatat(d, c->name, &st, AT_SYMLINK_NOFOLLOW) == 0 && like_ours(&st)) {
    /* Another identity's (the one the restore made it as was refused
     * first): a refusal, so that fsident_run tries the next. */
    if (st.st_uid != (uid_t)syscall(SYS_setfsuid, -1)) rc = -EPERM;
    else rc = unlinkat(d, c->name, 0) == 0 ? 1 : -errno;
  }
  close(d);
  return rc;
}

int exename_clear(const char* dir, const char* name, const struct fsident_list* who) {
  struct make_call c = {dir, name, 0, 0, 0};
  return fsident_run(who, NULL, clear_op, &c);
}
