/* See procscan.h. */
#define _GNU_SOURCE
#include "procscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PF_KTHREAD_FLAG 0x00200000u

/* The whole of a small /proc file into buf (NUL ended): its length, or
 * -errno. */
static ssize_t read_small(int dirfd, const char *path, char *buf, size_t cap) {
  int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  size_t got = 0;
  ssize_t err = 0;
  while (got + 1 < cap) {
    ssize_t n = read(fd, buf + got, cap - 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) err = -errno;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = 0;
  return err ? err : (ssize_t)got;
}

int procscan_facts(pid_t pid, struct procscan_facts *f) {
  char path[64], buf[4096];
  memset(f, 0, sizeof *f);
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  ssize_t got = read_small(AT_FDCWD, path, buf, sizeof buf);
  /* Empty: the process went as it was read. */
  if (got <= 0) return got < 0 ? (int)got : -ESRCH;
  /* comm may hold spaces and parentheses: it ends at the last ')'. */
  char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return -EPROTO;
  p += 2;
  f->state = *p;
  /* Fields 3 (the state) to 22, each ended by a space. */
  for (int i = 3; i <= 22; i++) {
    char *end = strchr(p, ' ');
    if (!end) return -EPROTO;
    if (i == 9) f->kthread = (strtoull(p, NULL, 10) & PF_KTHREAD_FLAG) != 0;
    if (i == 20) f->threads = strtol(p, NULL, 10);
    if (i == 22) f->start = strtoull(p, NULL, 10);
    p = end + 1;
  }
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  got = read_small(AT_FDCWD, path, buf, sizeof buf);
  if (got <= 0) return got < 0 ? (int)got : -ESRCH;
  char *u = strstr(buf, "\nUid:");
  if (!u) return -EPROTO;
  u += 5;
  for (int i = 0; i < 4; i++) {
    char *end;
    unsigned long v = strtoul(u, &end, 10);
    if (end == u) return -EPROTO;
    f->uid[i] = (uint32_t)v;
    u = end;
  }
  return 0;
}

/* Where the process's descriptors and environment are seen: /proc/PID,
 * or, once its main thread has exited while others run (a zombie leader
 * whose fd directory is empty and environ gives ESRCH), /proc/PID/task/TID
 * of a live thread (review r418 F2). 0, or -errno. */
static int process_dir(pid_t pid, const struct procscan_facts *f, char *out, size_t cap) {
  snprintf(out, cap, "/proc/%d", (int)pid);
  if (f->state != 'Z' || f->threads <= 1) return 0;
  char dir[64];
  snprintf(dir, sizeof dir, "/proc/%d/task", (int)pid);
  DIR *d = opendir(dir);
  if (!d) return -errno;
  int found = 0;
  errno = 0;
  for (struct dirent *de; !found && (de = readdir(d));) {
    long tid = strtol(de->d_name, NULL, 10);
    if (tid <= 0 || tid == pid) continue;
    char stat[96], buf[1024];
    snprintf(stat, sizeof stat, "%s/%ld/stat", dir, tid);
    if (read_small(AT_FDCWD, stat, buf, sizeof buf) <= 0) continue;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X') continue;
    snprintf(out, cap, "/proc/%d/task/%ld", (int)pid, tid);
    found = 1;
  }
  int err = found || !errno ? 0 : -errno;
  closedir(d);
  return err;
}

/* What fdinfo says of descriptor `name` of the fdinfo directory `dirfd`:
 * the mount id and inode number of the file it is, and its open flags,
 * from the struct file the descriptor is (no file system is asked).
 * `*ino` is left UINT64_MAX on a kernel that does not write it (before
 * 5.14). The kernel writes these lines first, and a driver's own text
 * after them, which may be a user's (a dma-buf's name may hold newlines):
 * the first of each is kept (review r452 F4). 0; 1 if it says no mount
 * id or no flags; or -errno. */
static int fd_identity(int dirfd, const char *name, uint64_t *mnt, uint64_t *ino, uint64_t *flags) {
  char buf[4096];
  ssize_t got = read_small(dirfd, name, buf, sizeof buf);
  if (got < 0) return (int)got;
  *mnt = 0;
  *ino = UINT64_MAX;
  *flags = 0;
  int have_mnt = 0, have_flags = 0, have_ino = 0;
  for (char *line = buf; line && *line && !(have_mnt && have_flags && have_ino);
       line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
    if (!have_mnt && !strncmp(line, "mnt_id:", 7)) {
      *mnt = strtoull(line + 7, NULL, 10);
      have_mnt = 1;
    } else if (!have_ino && !strncmp(line, "ino:", 4)) {
      *ino = strtoull(line + 4, NULL, 10);
      have_ino = 1;
    } else if (!have_flags && !strncmp(line, "flags:", 6)) {
      *flags = strtoull(line + 6, NULL, 8);
      have_flags = 1;
    }
  }
  return have_mnt && have_flags ? 0 : 1;
}

/* statx of what our descriptor `fd` holds, from the inode's cached
 * attributes (AT_STATX_DONT_SYNC): a FUSE or network file system answers
 * from its cache, where a plain fstat may ask its server, and a user's
 * FUSE server could hold root's look for ever. 0, or -errno. */
static int statx_cached(int fd, struct statx *sx) {
  return syscall(SYS_statx, fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO, sx) == 0 ? 0 : -errno;
}

int procscan_file_identity(const char *path, struct procscan_file *file) {
  int fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -errno;
  struct statx sx;
  int r = statx_cached(fd, &sx);
  close(fd);
  if (r != 0) return r;
  file->dev_major = sx.stx_dev_major;
  file->dev_minor = sx.stx_dev_minor;
  file->ino = sx.stx_ino;
  file->tied = 1;
  return 0;
}

/* Descriptor `name` of the fd directory `fddir` (the fdinfo directory
 * `infofd`), if it is open for reading and writing (not O_PATH), into
 * *file: the file it is, pinned. /proc/PID/fd/N opened O_PATH (the magic
 * link followed: no lookup, no file system's ->open) holds that file and
 * its mount while we look; its device and inode are from statx of our
 * own descriptor. The process's fdinfo for N then gives the flags, and a
 * mount id and inode that must be our pinned descriptor's (our own
 * fdinfo of it): a mount id of a mount we hold cannot have been freed and
 * given again, so the descriptor is, by then, of the file we examined.
 * An id looked up later (in mountinfo) could have been: a user namespace
 * frees a tmpfs of its own and binds /dev/shm, which takes the same id at
 * once (review r452 F1). Where fdinfo writes no inode (before 5.14),
 * nothing ties the flags to the file (a dup2 swap between the pin and the
 * read passes: review r452 F2): file->tied is 0. 0 if it is such a
 * descriptor; 1 if it is not (or no longer open); or -errno. */
static int pinned_file(int fddir, int infofd, const char *name, struct procscan_file *file) {
  int pin = openat(fddir, name, O_PATH | O_CLOEXEC);
  if (pin < 0) return errno == ENOENT ? 1 : -errno;
  char self[16];
  snprintf(self, sizeof self, "%d", pin);
  struct statx sx;
  uint64_t mnt, ino, flags, pin_mnt, pin_ino, pin_flags;
  int selfdir = open("/proc/self/fdinfo", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int r = selfdir < 0 ? -errno : 0;
  /* A file statx refuses even from its cache (a user's FUSE mount without
   * allow_other refuses root: EACCES) is no table file, and says nothing
   * of the look: it must not fail it. */
  if (r == 0 && statx_cached(pin, &sx) != 0) r = 1;
  if (r == 0) r = fd_identity(selfdir, self, &pin_mnt, &pin_ino, &pin_flags);
  if (r == 0) r = fd_identity(infofd, name, &mnt, &ino, &flags);
  if (r == -ENOENT) r = 1; /* closed since */
  if (r == 0 && ((flags & O_PATH) || (flags & O_ACCMODE) != O_RDWR || mnt != pin_mnt)) r = 1;
  if (r == 0 && ino != UINT64_MAX && pin_ino != UINT64_MAX && ino != pin_ino) r = 1;
  if (selfdir >= 0) close(selfdir);
  close(pin); /* the mount ids compared while it was held */
  if (r != 0) return r;
  file->dev_major = sx.stx_dev_major;
  file->dev_minor = sx.stx_dev_minor;
  file->ino = sx.stx_ino;
  file->tied = ino != UINT64_MAX && pin_ino != UINT64_MAX;
  return 0;
}

/* Whether a refusal (EACCES) to read a process's /proc entries means it is
 * not ours to look into, and so not looked at: for a caller that may look
 * into any process (CAP_SYS_PTRACE in effect, as root has outside a
 * container that drops it), a refusal comes from a security module's
 * policy, says nothing of the process, and fails the look instead (review
 * r435 N4: a process of the application in such a domain counted as
 * absent, and the registration was released under it). */
int procscan_refusal_is_absence(void) {
  static int answer = -1;
  if (answer >= 0) return answer;
  char buf[4096];
  int may_look_into_any = 0;
  if (read_small(AT_FDCWD, "/proc/self/status", buf, sizeof buf) > 0) {
    char *c = strstr(buf, "\nCapEff:");
    if (c) may_look_into_any = (strtoull(c + 8, NULL, 16) >> 19) & 1; /* CAP_SYS_PTRACE */
  }
  return answer = !may_look_into_any;
}

int procscan_targets(pid_t pid, const struct procscan_facts *f, const char *prefix,
                     void (*found)(const char *target, size_t len, const struct procscan_file *file, void *arg),
                     void *arg) {
  char base[96], dir[128], target[4096];
  size_t plen = strlen(prefix);
  const int absent_if_refused = procscan_refusal_is_absence();
  int r = process_dir(pid, f, base, sizeof base);
  if (r < 0) return r;
  snprintf(dir, sizeof dir, "%s/fd", base);
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return errno == EACCES && absent_if_refused ? 0 : -errno;
  int infofd = -1;
  char buf[4096] __attribute__((aligned(8)));
  long n = 0;
  while (r == 0 && (n = syscall(SYS_getdents64, dfd, buf, sizeof buf)) > 0)
    for (long off = 0; r == 0 && off < n;) {
      struct {
        uint64_t ino;
        int64_t off;
        unsigned short reclen;
        unsigned char type;
        char name[];
      } *de = (void *)(buf + off);
      off += de->reclen;
      if (de->name[0] == '.') continue;
      /* Relative to the directory: one lookup less per descriptor. */
      ssize_t l = readlinkat(dfd, de->name, target, sizeof target - 1);
      if (l < 0) {
        /* Closed since it was listed; or the process became one we may
         * not look into (it ran a setuid program). */
        if (errno != ENOENT && !(errno == EACCES && absent_if_refused)) r = -errno;
        continue;
      }
      if (l < (ssize_t)plen || memcmp(target, prefix, plen) != 0) continue;
      target[l] = 0;
      /* The link's text proves nothing of which file it is: a process in
       * a mount namespace of its own may hold a file of the same path on
       * a file system of its own (review r418 F1). The file pinned does.
       * Only a descriptor opened for reading and writing, as the preload
       * opens the table file (preload_fd.c): that takes the file's
       * permission (0600, its owner's), where an O_PATH one of the same
       * file is anyone's who may search /dev/shm (review r435 N1:
       * nobody's kept root's dead registrations). */
      if (infofd < 0) {
        snprintf(dir, sizeof dir, "%s/fdinfo", base);
        infofd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (infofd < 0) {
          r = errno == ENOENT || (errno == EACCES && absent_if_refused) ? 0 : -errno;
          break;
        }
      }
      struct procscan_file file;
      int k = pinned_file(dfd, infofd, de->name, &file);
      if (k == 0) found(target, (size_t)l, &file, arg);
      else if (k < 0 && k != -ENOENT && !(k == -EACCES && absent_if_refused)) r = k;
    }
  if (r == 0 && n < 0) r = -errno;
  if (infofd >= 0) close(infofd);
  close(dfd);
  /* Gone while we looked, or not ours to look into (not an error). */
  return r == -ESRCH || r == -ENOENT ? -ESRCH : r == -EACCES && absent_if_refused ? 0 : r;
}

long procscan_environ_value(pid_t pid, const char *name, char *out, size_t cap) {
  char base[96], path[128], buf[4096];
  size_t nlen = strlen(name);
  struct procscan_facts f;
  if (procscan_facts(pid, &f) != 0 || process_dir(pid, &f, base, sizeof base) != 0) return -1;
  snprintf(path, sizeof path, "%s/environ", base);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  /* Entry by entry across reads: `pos`, the place in the current entry;
   * `state`, 0 while the entry so far is "name=" or a prefix of it, 1 in
   * its value (copied to out), 2 once it is another's. */
  size_t pos = 0, got = 0;
  int state = 0;
  long result = -1;
  ssize_t n;
  while (result == -1 && (n = read(fd, buf, sizeof buf)) > 0)
    for (ssize_t i = 0; i < n; i++) {
      char c = buf[i];
      if (c == 0) {
        if (state == 1) {
          out[got] = 0;
          result = (long)got;
          break;
        }
        pos = 0;
        state = 0;
        continue;
      }
      if (state == 0) {
        if (pos < nlen ? c != name[pos] : c != '=') state = 2;
        else if (pos == nlen) state = 1;
        pos++;
      } else if (state == 1) {
        if (got + 1 >= cap) {
          result = -2;
          break;
        }
        out[got++] = c;
      }
    }
  /* The last entry may lack its NUL (a process that overwrote its area). */
  if (result == -1 && state == 1) {
    out[got] = 0;
    result = (long)got;
  }
  close(fd);
  return result;
}
