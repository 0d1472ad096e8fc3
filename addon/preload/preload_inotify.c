/*
 * inotify: the highest watch descriptor the kernel gave on each instance.
 *
 * The kernel numbers an instance's watches cyclically: a new watch gets
 * the first free number after the last one it gave, not after the highest
 * one still there. /proc shows only the watches there, so a program that
 * had removed its highest watches would, after a restore that adds the
 * rest again, get their numbers again for its next watches (a number it
 * may still hold for a watch it thinks is gone: events it reads would name
 * the wrong watch). So each inotify_add_watch that gets a number records
 * it here, per descriptor (the highest: the kernel's numbers only grow
 * until they pass INT_MAX), and the snapshot reads it
 * (appshot_inotify_last_wd; src/resources/inotify.ts): the restore then
 * spends numbers up to it.
 *
 * Kept with the descriptor as the other marks are (preload_fd.c): 0 for a
 * new instance, copied by dup, dup2, dup3 and F_DUPFD, dropped by close,
 * close_range and closefrom. A descriptor closed past them (a raw system
 * call) keeps it, and the next inotify instance given the number by
 * inotify_init starts at 0 again; one given it otherwise (received over a
 * socket) would keep a number of the closed one's: the snapshot takes it
 * only if it is at least the highest watch there. Descriptors from
 * INOTIFY_TRACKED up, an instance kept across an exec (the new program's
 * library starts with none) and one whose watches another process added
 * are not followed, or not wholly: the numbering then goes on from the
 * highest number recorded or watched there, as before.
 */
#include "preload.h"

#include <sys/inotify.h>

#define INOTIFY_TRACKED 1024

int32_t appshot_inotify_last_wd[INOTIFY_TRACKED] API;

static inline int tracked(int fd) { return fd >= 0 && fd < INOTIFY_TRACKED; }

static void set_last(int fd, int32_t wd) {
  if (tracked(fd)) __atomic_store_n(&appshot_inotify_last_wd[fd], wd, __ATOMIC_RELAXED);
}

void inotify_wd_forget(int fd) {
  /* Read first: a store would dirty the page (a copy-on-write fault in a
   * fork's child) for every close. */
  if (tracked(fd) && __atomic_load_n(&appshot_inotify_last_wd[fd], __ATOMIC_RELAXED)) set_last(fd, 0);
}

void inotify_wd_forget_range(unsigned int first, unsigned int last) {
  for (unsigned int fd = first; fd <= last && fd < INOTIFY_TRACKED; fd++) inotify_wd_forget((int)fd);
}

void inotify_wd_copy(int from, int to) {
  if (!tracked(to) || from == to) return;
  int32_t wd = tracked(from) ? __atomic_load_n(&appshot_inotify_last_wd[from], __ATOMIC_RELAXED) : 0;
  if (wd || __atomic_load_n(&appshot_inotify_last_wd[to], __ATOMIC_RELAXED)) set_last(to, wd);
}

API int inotify_init1(int flags) {
  long r = SYS1(inotify_init1, flags);
  if (r >= 0) inotify_wd_forget((int)r);
  return (int)libc_ret(r);
}

API int inotify_init(void) { return inotify_init1(0); }

API int inotify_add_watch(int fd, const char *path, uint32_t mask) {
  long r = SYS3(inotify_add_watch, fd, path, mask);
  if (r > 0 && tracked(fd)) {
    int32_t *at = &appshot_inotify_last_wd[fd];
    int32_t was = __atomic_load_n(at, __ATOMIC_RELAXED);
    while ((int32_t)r > was &&
           !__atomic_compare_exchange_n(at, &was, (int32_t)r, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
  return (int)libc_ret(r);
}
