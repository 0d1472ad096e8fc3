/* Page data: which pages of a tracee's mapping exist, and copying them into
 * an image's page file, page-aligned, so that a restore can map the file
 * directly. Plain C; the addon wraps it. */
#ifndef APPSHOT_PAGES_H
#define APPSHOT_PAGES_H

#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/types.h>

#include "syncs.h"

/* PAGEMAP_SCAN (Linux 6.7): the build machine's linux/fs.h may predate it,
 * so its ABI is here, for the dirty tracking below and for appshot check. */
struct appshot_page_region {
  uint64_t start, end, categories;
};
struct appshot_pm_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define APPSHOT_PAGEMAP_SCAN _IOWR('f', 16, struct appshot_pm_scan_arg)
#define APPSHOT_PM_SCAN_WP_MATCHING (1ull << 0)
#define APPSHOT_PM_SCAN_CHECK_WPASYNC (1ull << 1)
#define APPSHOT_PAGE_IS_WRITTEN (1ull << 1)
#define APPSHOT_PAGE_IS_FILE (1ull << 2)
#define APPSHOT_PAGE_IS_PRESENT (1ull << 3)
#define APPSHOT_PAGE_IS_SWAPPED (1ull << 4)
#define APPSHOT_PAGE_IS_PFNZERO (1ull << 5)

/* Which pages of a mapping hold state of the process's own. */
typedef enum {
  PAGES_ANON = 0,         /* private anonymous: every present or swapped page */
  PAGES_PRIVATE_FILE = 1, /* private file mapping: only pages written (now anonymous) */
  PAGES_ALL_PRESENT = 2,  /* any present page (shared memory read through the process) */
  PAGES_ALL = 3,          /* every page, present or not (a file that may not outlive us) */
} pages_mode;
/* Or'ed into a pw_dump mode: every chunk's page map read, none skipped by
 * PAGEMAP_SCAN, which passes over a VM_PFNMAP mapping as if it had no
 * page (a private mapping of a device: its written pages are anonymous). */
#define PAGES_NO_SCAN 8

/* Where a page of an incremental snapshot's parent keeps its bytes. */
typedef struct {
  const uint32_t* index;  /* page index inside the mapping, ascending */
  const uint32_t* file;   /* which parent page file (see page_writer.parents) */
  const uint64_t* offset; /* byte offset in that file */
  size_t count;
  /* With dirty tracking: (first page, count) pairs, ascending, of the pages
   * written since the parent. A page outside them that the parent holds is
   * the parent's, unread; without tracking (NULL) every page is compared. */
  const uint32_t* written;
  size_t nwritten;
  int tracked; /* `written` is meaningful (it may be empty) */
} pages_parent;

/* PAGEMAP_SCAN (Linux 6.7): the pages of [start, end) written since they
 * were last write-protected through userfaultfd (asynchronous mode), as
 * (first page, count) pairs relative to start, in *out (malloc'd). With
 * reset, they are write-protected again in the same pass. Returns the
 * number of pairs, or -errno (EPERM: the range is not tracked). */
long pages_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int reset, uint32_t** out);

struct pw_queue;

/* The page file is checked by chunks of this size (the last one shorter),
 * each with its own SHA-256 in the image's signed manifest: a restore
 * checks them on every core at once, and an eager restore copies a chunk
 * as soon as it is checked (see pages_check below). */
#define PAGES_CHUNK (1u << 20)
#define PAGES_DIGEST 32

/* The SHA-256 of each chunk of the page file, hashed by threads of the
 * writer's own as chunks are complete in the file, sixteen side by side
 * where the CPU has AVX-512 (sha256x16.h): from the mapping where
 * the file is mapped, else read back from the file (the page cache, most
 * likely), so that committing an image reads nothing back; each chunk
 * hashed is sent to the disk at once (sync_file_range), so that the fsync
 * finds little left. See pw_hash_start. */
struct pw_sums;
/* One-shot SHA-256 (OpenSSL's, which Node carries and exports): 0 or -EIO. */
int pages_sha256(const void* data, size_t len, uint8_t out[PAGES_DIGEST]);

typedef struct {
  int file_fd;    /* the unnamed file in the image's directory */
  /* The file mapped shared (see pw_open), or NULL: pages are then read
   * straight into it, and `buf` is a window of it rather than a buffer of
   * our own. `allocated`: the bytes fallocate'd so far (the file's size
   * until pw_finish cuts it to `size`); `map_len`: the address range
   * reserved for it. */
  uint8_t* map;
  uint64_t map_len, allocated; /* buffered: the end of what pw_reserve wrote */
  uint64_t size;  /* bytes written so far; always a multiple of the page size */
  struct pw_sums* sums; /* SHA-256 per chunk of what is written */
  uint8_t* buf;
  size_t buf_used, buf_size;
  /* Page files of the parent chain, mapped read-only, for comparing. */
  const uint8_t** parents;
  const uint64_t* parent_sizes;
  size_t nparents;
  /* Full buffers go to a writer thread (see pw_open), or NULL. */
  struct pw_queue* queue;
  /* How long pw_finish waited for the writer thread to empty its queue,
   * and then for fsync: the image's phases (snapshot --json). */
  uint64_t drain_ns, fsync_ns;
  /* And then for the last chunk digests (hashed while it synced). */
  uint64_t hash_wait_ns;
  /* pw_finish's fsync when it was left running (defer_sync): waited for
   * by pw_synced (fsync_ns then its own duration), or by pw_abort. */
  struct fsync_job file_sync;
  int file_sync_pending;
  /* /proc/PID/mem of the process whose pages were read last (mem_pid), or
   * -1: opened once for every mapping of a process, not once per run of
   * pages; closed by pw_finish or pw_abort. */
  int mem_fd;
  pid_t mem_pid;
  /* And its /proc/PID/pagemap (see read_remote_cached), or -1; vm_read_off:
   * process_vm_readv was refused once, so not tried again (or
   * APPSHOT_PAGES_PIN=0 in the environment at pw_open, for measuring). */
  int pagemap_fd;
  int vm_read_off;
} page_writer;

/* The process a mapping's process was forked from, when that process has
 * the same private anonymous mapping at the same address: its pages still
 * shared copy-on-write are not stored again (see pw_dump). */
typedef struct {
  pid_t pid;
  int pagemap_fd;
} pages_forked_from;

/* Result of dumping one mapping: runs of pages, as (first page, count)
 * pairs relative to the mapping's start, in `runs`; the same for pages
 * identical to the parent's, in `same`; and for pages still shared
 * copy-on-write with the process it was forked from, in `shared`. */
typedef struct {
  uint32_t* runs;
  size_t nruns, runs_cap;
  uint32_t* same;
  size_t nsame, same_cap;
  uint32_t* shared;
  size_t nshared, shared_cap;
  uint64_t pages_written;
  uint64_t data_offset; /* where this mapping's pages start in the file */
} pages_result;

uint32_t pages_crc32c(uint32_t crc, const void* data, size_t len);
/* CRC-32C and size of what is left to read of `fd`, read through one of
 * the buffers this process keeps warm (pages.c); 0 or -errno. */
int pages_crc32c_fd(int fd, uint32_t* crc, uint64_t* size);
/* Reads `len` bytes at offset `off` of `fd` into `dst`, pread after pread
 * (EINTR retried): 0, -ENODATA if the file ends first, or -errno. */
int pages_pread_whole(int fd, uint64_t off, void* dst, size_t len);
/* Where the first data at or after `off` is in the file of `seek_fd`, a
 * description of its own (lseek(SEEK_DATA) moves its position, which a
 * caller's descriptor must not share: pages_seek_fd), if before `end`;
 * `end` if from `off` to `end` is all a hole (it reads as zeros), so a
 * sparse page file is not read through its holes. Any doubt (lseek
 * unsupported, seek_fd -1, a file that ends before `end`): `off`. */
uint64_t pages_data_from(int seek_fd, uint64_t off, uint64_t end);
/* A description of the open file of `fd` of its own (its magic link),
 * for pages_data_from; -1 if none (then no hole is looked for). */
int pages_seek_fd(int fd);
/* Unmaps the buffers kept warm (pages.c) that lay unused for at least
 * `unused_seconds`; how many. */
int pages_release_kept(int unused_seconds);

/* Opens an unnamed file (O_TMPFILE) in `dir`: if the writer dies before
 * pw_link, nothing is left behind. Pages are read from the application
 * into a few buffers of our own, allocated and touched here (so before
 * the freeze), and written with write(): with a `queue_limit`, full
 * buffers are written by a thread of the writer's own while reading goes
 * on (the pool: up to 4 buffers of 2 MiB, fewer if the limit is lower),
 * the reading waiting for one written out when none is free. A full disk
 * is write()'s ENOSPC. The chunk digests are hashed from the file's page
 * cache, read back.
 * With APPSHOT_PAGES_MAP=1 in the environment (where the file system can
 * allocate ahead: fallocate), the file is instead mapped shared and pages
 * read straight into it: one copy less, but a fault per page, which costs
 * more than the copy on a VM (see map_open in pages.c).
 * With `direct` (and a queue limit; APPSHOT_PAGES_DIRECT=1 or 0 in the
 * environment decides instead, for measuring), the writer thread
 * writes the file with O_DIRECT and the chunks are hashed from its
 * buffers: no page cache is made for the page file (on a VM whose host
 * takes freed memory back, most of what a large snapshot costs in CPU),
 * nothing is written ahead (pw_reserve does nothing), and the reading
 * waits for the disk (see direct_open in pages.c). */
int pw_open(page_writer* w, const char* dir, uint64_t queue_limit, int direct);
/* Makes the page cache of the file's first `bytes` now (written with
 * zeros, or allocated and faulted in where it is mapped): called before
 * the application is frozen with what its image will about hold, so that
 * copying into the file then finds its pages there. Getting memory for
 * the first time is most of what copying into it costs (on a VM whose
 * host backs guest memory on demand, several times the copy). What is
 * not used is cut off by pw_finish. 0, or -errno (nothing is wrong then:
 * only not prepared). */
int pw_reserve(page_writer* w, uint64_t bytes);
/* Copies the selected pages of [start, end) in `pid`. `pagemap_fd` is the
 * tracee's /proc/PID/pagemap, opened by the caller once per process. With
 * `forked_from` (PAGES_ANON only), a page that is the very page the other
 * process has at the same address is listed in `shared` and not copied. */
int pw_dump(page_writer* w, pid_t pid, int pagemap_fd, uint64_t start, uint64_t end,
            pages_mode mode, const pages_parent* parent, const pages_forked_from* forked_from,
            pages_result* out);
/* Whether [start, end) holds any page present or swapped (pagemap's own
 * sense: the zero page, a guard or uffd-wp marker count), in one
 * PAGEMAP_SCAN that stops at the first: 1 or 0, or -errno (-ENOTTY,
 * -EINVAL: a kernel without it). */
long pages_scan_any(int pagemap_fd, uint64_t start, uint64_t end);
/* The address of the first page in [start, end) present or swapped, in
 * *first: 1 found, 0 none, -errno (-EINVAL/-ENOTTY: no PAGEMAP_SCAN). */
long pages_scan_first(int pagemap_fd, uint64_t start, uint64_t end, uint64_t* first);
/* How many pages of [start, end) are present or swapped, counted up to
 * `limit` (the walk stops there), or -errno. */
long pages_scan_count(int pagemap_fd, uint64_t start, uint64_t end, uint64_t limit);
/* PAGEMAP_SCAN (Linux 6.7): every run of pages of [start, end) that is
 * present or swapped, with its categories (APPSHOT_PAGE_IS_PRESENT,
 * _SWAPPED, _FILE: not anonymous, _PFNZERO: the shared zero page), in
 * ascending order, in *out (malloc'd): one ioctl, in place of a pagemap
 * read per mapping. Returns their number, or -errno (ENOTTY or EINVAL
 * where the kernel lacks it). */
long pages_scan_present(int pagemap_fd, uint64_t start, uint64_t end,
                        struct appshot_page_region** out);
/* As pw_dump of [start, end) with no parent and no process forked from,
 * in mode PAGES_ANON or PAGES_PRIVATE_FILE, the pages taken from `regions`
 * (pages_scan_present's, over a range holding this one) rather than from
 * pagemap: a page is copied when pw_dump would copy it (pages of the zero
 * page, which it reads and drops, are not read). `cursor`: where to start
 * in `regions`, advanced past what ends before `end`, for a caller going
 * through mappings in ascending order. */
int pw_dump_scanned(page_writer* w, pid_t pid, const struct appshot_page_region* regions,
                    size_t nregions, size_t* cursor, uint64_t start, uint64_t end,
                    pages_mode mode, pages_result* out);
/* Appends bytes (a SysV segment, a deleted file), padded to a page. */
int pw_append(page_writer* w, const void* data, size_t len, uint64_t* offset);
/* Copies every data extent of an open file (holes stay holes), appending it
 * page-aligned; used for shared memory objects read through map_files. */
int pw_append_fd(page_writer* w, int fd, uint64_t length, uint32_t** runs, size_t* nruns,
                 uint64_t* offset);
/* Bytes written to the file so far, and a bounded wait for the writer
 * thread to catch up (see pages.c): what a progress display reads. */
uint64_t pw_written(page_writer* w);
int pw_drain(page_writer* w, int timeout_ms);
/* Lets the hashing threads start on what is written: one thread (`all`
 * 0: beside the reading, or the writer thread while it writes what is
 * queued) or one per core. Until then, nothing is hashed: a snapshot that
 * leaves the application running calls it once the application's state
 * is read, so that the reading shares its cores with no hashing; one that
 * ends it, at once. pw_finish hashes what is left on every core. */
void pw_hash_start(page_writer* w, int all);
/* Starts sending what the writer thread writes to the disk as it goes
 * (written back by steps, the device's cache flushed every few tens of
 * MiB: see flusher_main in pages.c), so that pw_finish's fsync finds
 * little left. Called once the application's memory is read at the pace
 * the application can spare (it ended or frozen: with the freeze; left
 * running: once it runs again). Nothing with APPSHOT_PAGES_FLUSH_AHEAD=0
 * (for measuring), or where the file is mapped; written with O_DIRECT,
 * the device's cache flushes alone. */
void pw_flush_start(page_writer* w);
/* Flushes and syncs, and waits for the chunk digests; the file stays open
 * until pw_link or pw_abort. With `defer_sync`, the fsync is only started
 * (on a thread of its own, beside the last digests and whatever the
 * caller does next) and pw_synced waits for it. */
int pw_finish(page_writer* w, int defer_sync);
/* After pw_finish(w, 1): waits for its fsync; 0 or -errno (fsync_ns set).
 * 0 at once if nothing is pending. */
int pw_synced(page_writer* w);
/* After pw_finish: the chunk table (PAGES_DIGEST bytes per chunk). */
const uint8_t* pw_chunk_table(page_writer* w, size_t* nchunks);
/* Gives the finished file its name. */
int pw_link(page_writer* w, const char* path);
void pw_abort(page_writer* w);

/* ---- checking a page file against its chunk digests, on threads of its
 * own (one per core), from the first chunk on; where the CPU runs
 * sha256x16 (and APPSHOT_SHA_LANES is not 0), by groups of up to sixteen
 * whole chunks hashed side by side, the first thread's from the front and
 * the others' from the back (see check_take in pages.c). A chunk the
 * lanes find different is refused only once OpenSSL's SHA-256 of it finds
 * it different too; should OpenSSL find it good, the lanes are wrong:
 * this process uses them no more, and in every check of it still in use
 * the chunks they vouched for are checked again with OpenSSL before any
 * pages_check_wait reports them good (a wait that had already returned
 * good before is not taken back). */
typedef struct pages_check pages_check;

/* Starts checking `size` bytes of `fd` (duplicated: the caller may close
 * its own) against `table` (PAGES_DIGEST bytes per chunk of `chunk`
 * bytes, copied). NULL with *err set if it cannot start. */
pages_check* pages_check_start(int fd, uint64_t size, uint32_t chunk, const uint8_t* table,
                               size_t table_len, int threads, int* err);
/* Waits until every chunk touching [off, off + len) is checked, or
 * `timeout_ms` passed (negative: no limit). Returns 0 when they all
 * matched, 1 on timeout, -EBADMSG when one did not match (*bad: the first
 * such chunk), -errno when the file could not be read (*bad likewise). */
int pages_check_wait(pages_check* c, uint64_t off, uint64_t len, int timeout_ms, uint64_t* bad);
/* Bytes checked so far (for progress). */
uint64_t pages_check_done(pages_check* c);
/* Chunks found good by the lanes (tests and benches: that they ran). */
uint64_t pages_check_by_lanes(pages_check* c);
/* Stops the threads (what is left unchecked stays so) and frees. */
void pages_check_stop(pages_check* c);

#endif
