/* See procscan.h. */
#define _GNU_SOURCE
#include "procscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PF_KTHREAD_FLAG 0x00200000u

/* The whole of a small /proc file into buf (NUL ended): its length, or -1. */
static ssize_t read_small(const char *path, char *buf, size_t cap) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  size_t got = 0;
  while (got + 1 < cap) {
    ssize_t n = read(fd, buf + got, cap - 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = 0;
  return (ssize_t)got;
}

int procscan_facts(pid_t pid, struct procscan_facts *f) {
  char path[64], buf[4096];
  memset(f, 0, sizeof *f);
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  if (read_small(path, buf, sizeof buf) <= 0) return -1;
  /* comm may hold spaces and parentheses: it ends at the last ')'. */
  char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return -1;
  p += 2;
  /* Fields 3 (the state) to 22, each ended by a space. */
  for (int i = 3; i <= 22; i++) {
    char *end = strchr(p, ' ');
    if (!end) return -1;
    if (i == 9) f->kthread = (strtoull(p, NULL, 10) & PF_KTHREAD_FLAG) != 0;
    if (i == 22) f->start = strtoull(p, NULL, 10);
    p = end + 1;
  }
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  if (read_small(path, buf, sizeof buf) <= 0) return -1;
  char *u = strstr(buf, "\nUid:");
  if (!u) return -1;
  u += 5;
  for (int i = 0; i < 4; i++) {
    char *end;
    unsigned long v = strtoul(u, &end, 10);
    if (end == u) return -1;
    f->uid[i] = (uint32_t)v;
    u = end;
  }
  return 0;
}

int procscan_targets(pid_t pid, const char *prefix,
                     void (*found)(const char *target, size_t len, void *arg),
                     void *arg) {
  char dir[64], target[4096];
  size_t plen = strlen(prefix);
  snprintf(dir, sizeof dir, "/proc/%d/fd", (int)pid);
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return -1;
  char buf[4096] __attribute__((aligned(8)));
  long n;
  while ((n = syscall(SYS_getdents64, dfd, buf, sizeof buf)) > 0)
    for (long off = 0; off < n;) {
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
      if (l < (ssize_t)plen || memcmp(target, prefix, plen) != 0) continue;
      target[l] = 0;
      found(target, (size_t)l, arg);
    }
  close(dfd);
  return 0;
}

long procscan_environ_value(pid_t pid, const char *name, char *out, size_t cap) {
  char path[64], buf[4096];
  size_t nlen = strlen(name);
  snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
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
