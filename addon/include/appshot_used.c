/*
 * Every used slot of a table, found without touching the file's holes: see
 * appshot_used.h. Compiled into the preload library and init.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "appshot_used.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* `len` bytes at `off`, all of them: 0, or -1 (an error, or the file ended
 * first). */
static int read_whole(int fd, void *buf, size_t len, uint64_t off) {
  char *p = buf;
  while (len) {
    long n = appshot_raw_syscall(SYS_pread64, fd, (long)p, (long)len, (long)off, 0, 0);
    if (n == -EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    off += (uint64_t)n;
    len -= (size_t)n;
  }
  return 0;
}

/* The header's fixed part, up to and with key_salt (a random 64-bit number
 * per file): the descriptor's file is the one mapped if it reads the same. */
#define SAME_PREFIX (offsetof(struct appshot_header, key_salt) + sizeof(uint64_t))

static int fd_is_mapped_file(const struct appshot_used *u) {
  char prefix[SAME_PREFIX];
  return read_whole(u->fd, prefix, sizeof prefix, 0) == 0 &&
         memcmp(prefix, u->h, sizeof prefix) == 0;
}

void appshot_used_begin(struct appshot_used *u, const struct appshot_header *h,
                        int fd, enum appshot_kind kind) {
  u->h = h;
  u->fd = fd;
  u->kind = (uint32_t)kind;
  u->capacity = appshot_capacity(kind);
  u->next = u->run_end = 0;
  u->checked = 0;
  if (u->fd >= 0 && !fd_is_mapped_file(u)) u->fd = -1;
}

/* Finds the next run of slots in data pages, from `next` on: 0 with
 * [next, run_end) set, or -1 at the end of the array (no data left in it),
 * or with u->fd -1 (lseek failed: the rest through the mapping). */
static int next_run(struct appshot_used *u) {
  const uint64_t size = sizeof(struct appshot_entry);
  const uint64_t start = appshot_entries_offset((enum appshot_kind)u->kind);
  const uint64_t end = start + (uint64_t)u->capacity * size;
  if (u->next >= u->capacity) return -1;
  uint64_t off = start + (uint64_t)u->next * size;
  long data = appshot_raw_syscall(SYS_lseek, u->fd, (long)off, SEEK_DATA, 0, 0, 0);
  if (data == -ENXIO) return -1; /* no data from `off` to the file's end */
  if (data >= 0 && (uint64_t)data >= end) return -1;
  long hole = data < 0 ? data : appshot_raw_syscall(SYS_lseek, u->fd, data, SEEK_HOLE, 0, 0, 0);
  if (data < 0 || hole <= data) {
    u->fd = -1;
    return -1;
  }
  /* Pages are whole multiples of an entry (16 bytes, the array 64-byte
   * aligned): no entry straddles a run's edge. */
  u->next = (uint32_t)(((uint64_t)data - start) / size);
  uint64_t stop = (uint64_t)hole < end ? (uint64_t)hole : end;
  u->run_end = (uint32_t)((stop - start + size - 1) / size);
  return 0;
}

int64_t appshot_used_next(struct appshot_used *u) {
  for (;;) {
    if (u->fd < 0) /* every slot, for the caller to read in the mapping */
      return u->next < u->capacity ? (int64_t)u->next++ : -1;
    if (u->next < u->run_end) return (int64_t)u->next++;
    if (next_run(u) == 0) continue;
    if (u->fd < 0) continue; /* failed: the rest through the mapping */
    /* The end. Still the mapped file? A dup2 onto the descriptor may have
     * put another file there meanwhile: then where it said the data was
     * is worth nothing, and the mapping is walked from the start. */
    if (!u->checked) {
      u->checked = 1;
      if (!fd_is_mapped_file(u)) {
        u->next = 0;
        u->fd = -1;
        continue;
      }
      u->next = u->run_end = u->capacity; /* and stays at the end */
    }
    return -1;
  }
}
