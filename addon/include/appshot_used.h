/*
 * Every used slot of a table, found without touching the file's holes.
 *
 * The table file is a MAP_SHARED tmpfs file, mostly holes: a table's entry
 * array is allocated page by page as entries are stored. A read of a hole
 * through the mapping allocates the page (a shared read fault on tmpfs
 * fills the page cache), so a walk of all 8192 PID slots through the
 * mapping made a file of a few entries take 128 KiB more memory, for the
 * life of the application (420 MB of /dev/shm at 1,000 clones). A read()
 * of a hole returns zeros and allocates nothing, and lseek(SEEK_DATA) on
 * tmpfs skips holes (counting pages swapped out as data).
 *
 * So: the array is read with pread from a descriptor of the file, only
 * where lseek says there is data, in chunks of APPSHOT_USED_CHUNK entries
 * into the iterator (on the caller's stack: no allocation). A slot whose
 * copy is not free is handed to the caller, who reads it again through the
 * mapping (appshot_entry_at): the copy says only where to look, the
 * mapping's 64-bit load is what is acted on (a pread copy of a word being
 * stored may be torn; a used entry's stored word has its bytes 3 and 7
 * nonzero, since no id handed out is negative, so a torn copy of a used
 * word is never all zeros).
 *
 * What it misses is what a walk of the mapping misses: an entry stored
 * after the walk passed its slot. An entry there from the walk's start to
 * its end is in a page that was data all along (nothing punches holes in
 * the file), and is found. That is what a caller that must reach every
 * process or object needs (kill(-1), a forwarded signal, the removal of
 * the SysV objects), which the scan API (appshot_table.h) does not give.
 *
 * Without a usable descriptor (none, a read error, a file that is not the
 * one mapped: its header differs from the mapping's), the walk goes on
 * through the mapping from where it was, every slot: correct, at the cost
 * of the memory. A descriptor found to be another file only at the end
 * (a dup2 onto it meanwhile) has the whole table walked again through the
 * mapping: slots may then be handed out twice, never missed.
 *
 * The lseeks move the descriptor's file offset, which nothing reads (the
 * file is used through mmap and pread only). Raw system calls, no libc:
 * async-signal-safe, no cancellation point (pread is one, and kill is
 * not), and in the preload library never one of its own wrappers.
 */
#ifndef APPSHOT_USED_H
#define APPSHOT_USED_H

#include "appshot_table.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 64 entries, 1 KiB: small enough for a signal handler's stack (kill(-1)
 * from a handler on an 8 KiB alternate stack). */
#define APPSHOT_USED_CHUNK 64u

struct appshot_used {
  const struct appshot_header *h;
  int fd;                 /* -1: through the mapping, every slot */
  uint32_t kind;
  uint32_t capacity;
  uint32_t next;          /* first slot not yet copied (or handed out) */
  uint32_t base, have, at; /* the copy: `have` slots from `base`; next to
                              look at: base + at */
  int checked;            /* the end's check of the descriptor is done */
  uint64_t data_end;      /* end of the data run `next` is in (file offset) */
  struct appshot_entry copy[APPSHOT_USED_CHUNK];
};

/* Starts a walk of `kind`'s slots; `fd` is a descriptor of the file `h`
 * maps (readable), or -1. */
void appshot_used_begin(struct appshot_used *u, const struct appshot_header *h,
                        int fd, enum appshot_kind kind);
/* The next slot that may be used (check it with appshot_entry_at), or -1
 * at the end. */
int64_t appshot_used_next(struct appshot_used *u);

#ifdef __cplusplus
}
#endif

#endif
