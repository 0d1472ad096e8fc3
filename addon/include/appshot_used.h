/*
 * Every used slot of a table, found without touching the file's holes.
 *
 * The table file is a MAP_SHARED tmpfs file, mostly holes: a table's entry
 * array is allocated page by page as entries are stored. A read of a hole
 * through the mapping allocates the page (a shared read fault on tmpfs
 * fills the page cache), so a walk of all 8192 PID slots through the
 * mapping made a file of a few entries take 128 KiB more memory, for the
 * life of the application (420 MB of /dev/shm at 1,000 clones).
 *
 * lseek(SEEK_DATA) and lseek(SEEK_HOLE) on a descriptor of the file say
 * where its data pages are, reading and allocating nothing (tmpfs counts
 * a page swapped out as data). Only the slots in data pages are handed to
 * the caller, who reads them through the mapping as before
 * (appshot_entry_at: the atomic 64-bit load the lookups use), which
 * allocates nothing either: those pages are there. No copy of the entries
 * is made: a pread copy, as the engine's readTables makes, in chunks of
 * 1 KiB (what a signal handler's stack has room for) cost ~170 us a walk
 * of the PID table; this walk, two lseeks a run, ~7 us with a few entries
 * and ~30 us when every page of the array holds some (the mapping walk it
 * replaces: 12-20 us once its pages were allocated).
 *
 * What it misses is what a walk of the mapping misses: an entry stored
 * after the walk passed its slot. An entry there from the walk's start to
 * its end is in a page that was data all along (nothing punches holes in
 * the file), and is found. That is what a caller that must reach every
 * process or object needs (kill(-1), a forwarded signal, the removal of
 * the SysV objects), which the scan API (appshot_table.h) does not give:
 * it stops at the count, and may miss an entry while others come and go.
 *
 * Without a usable descriptor (none, an lseek error, a file that is not
 * the one mapped: its header reads differently from the mapping's), the
 * walk goes on through the mapping from where it was, every slot: correct,
 * at the cost of the memory. A descriptor found to be another file only
 * at the end (a dup2 onto it meanwhile) has the whole table walked again
 * through the mapping: slots may then be handed out twice, never missed.
 *
 * The lseeks move the descriptor's file offset, which nothing reads (the
 * file is used through mmap and pread only). Raw system calls, no libc:
 * async-signal-safe, no cancellation point (pread is one, and kill is
 * not), and in the preload library never one of its own wrappers. No
 * allocation, and the iterator is a few words of the caller's stack.
 */
#ifndef APPSHOT_USED_H
#define APPSHOT_USED_H

#include "appshot_table.h"

#ifdef __cplusplus
extern "C" {
#endif

struct appshot_used {
  const struct appshot_header *h;
  int fd;            /* -1: through the mapping, every slot */
  uint32_t kind;
  uint32_t capacity;
  uint32_t next;     /* the next slot to hand out */
  uint32_t run_end;  /* the end of the run of data pages `next` is in */
  int checked;       /* the end's check of the descriptor is done */
};

/* Starts a walk of `kind`'s slots; `fd` is a descriptor of the file `h`
 * maps (readable), or -1. */
void appshot_used_begin(struct appshot_used *u, const struct appshot_header *h,
                        int fd, enum appshot_kind kind);
/* The next slot that may be used (read it with appshot_entry_at), or -1 at
 * the end. */
int64_t appshot_used_next(struct appshot_used *u);

#ifdef __cplusplus
}
#endif

#endif
