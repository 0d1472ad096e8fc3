#define _GNU_SOURCE
#include "pages.h"
#include "testknobs.h"
/* Compiled here, as part of the page data's unit (binding.gyp lists the
 * addon's C files; this one serves pages.c alone). */
#include "sha256x16.c"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define PAGE 4096u
#define PM_PRESENT (1ull << 63)
#define PM_SWAPPED (1ull << 62)
#define PM_FILE_OR_SHARED (1ull << 61)
#define PM_MMAP_EXCLUSIVE (1ull << 56)
#define PM_PFN (((1ull << 55)) - 1)
/* Pagemap entries read per pread: 512 KiB covers 256 MiB of address space. */
#define PM_CHUNK 65536u
/* The buffered path's buffers: a few, allocated and touched when the
 * writer opens (before the application is frozen), then used over and
 * over. See warm_buffer. */
#define WRITE_BUFFER (2u << 20)
#define WRITE_POOL 4

/* ---- CRC-32C (Castagnoli): the SSE4.2 instruction where the CPU has it,
 * a table otherwise. One checksum per image part; a flipped bit anywhere
 * changes it. */

static uint32_t crc_table[256];

static void crc_table_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
    crc_table[i] = c;
  }
}

static uint32_t crc_soft(uint32_t crc, const uint8_t* p, size_t n) {
  if (!crc_table[1]) crc_table_init();
  while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t* p,
                                                          size_t n) {
  uint64_t c = crc;
  while (n && ((uintptr_t)p & 7)) {
    c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    n--;
  }
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
  return (uint32_t)c;
}
#endif

uint32_t pages_crc32c(uint32_t crc, const void* data, size_t len) {
  crc = ~crc;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("sse4.2")) return ~crc_hw(crc, data, len);
#endif
  return ~crc_soft(crc, data, len);
}

static int read_mem(int fd, uint64_t addr, void* dst, size_t len);

/* ---- SHA-256 per chunk */

int pages_sha256(const void* data, size_t len, uint8_t out[PAGES_DIGEST]) {
  unsigned int n = 0;
  return EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) == 1 && n == PAGES_DIGEST ? 0 : -EIO;
}

struct pw_sums {
  int fd; /* the writer's file */
  const uint8_t* map; /* the file mapped (see page_writer.map), or NULL */
  pthread_mutex_t mu;
  pthread_cond_t changed;
  uint64_t written; /* bytes in the file (what the writer thread wrote) */
  int final;        /* no more will come */
  int level;        /* how many of the threads may work */
  int stop;
  int err;
  size_t next, done; /* the next chunk to take; chunks hashed */
  int lanes;         /* sha256x16 runs here: whole chunks are hashed sixteen at a time */
  uint8_t* table;
  size_t cap;        /* chunks the table has room for */
  pthread_t threads[8];
  int nthreads, max_threads;
  /* Sending what is written to the disk while the rest is still copied
   * (see flusher_main): the thread, whether it runs, the directory the
   * file is in (its fdatasync: the device's write cache flushed without
   * the file's other dirty pages), and how far it got. */
  pthread_t flusher;
  int flushing;
  int dir_fd;
  uint64_t started, flushed;
  uint64_t landed; /* bytes the writer put in the file, by either path */
};

/* The CLOCK_REALTIME instant `ms` from now, as pthread_cond_timedwait
 * wants it. */
static struct timespec deadline_after(int ms) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  t.tv_sec += ms / 1000;
  t.tv_nsec += (long)(ms % 1000) * 1000000L;
  if (t.tv_nsec >= 1000000000L) {
    t.tv_sec++;
    t.tv_nsec -= 1000000000L;
  }
  return t;
}

/* Buffers kept between uses, in this process: a resident engine or
 * `appshot serve` writes and checks one page file after another, and a
 * buffer mapped afresh each time is memory touched for the first time
 * each time, which on a VM costs far more than the copying into it (see
 * warm_buffer; the page writer's pool, 4 x 2 MiB made warm per snapshot,
 * and a 4 MiB buffer per checksummed file took 15-45 ms of a tiny
 * application's snapshot on this project's VM, whose freed memory the
 * host takes back). At most KEPT_MAX buffers of at most WRITE_BUFFER bytes
 * (16 MiB), and only of the write and chunk sizes, so that a page file's
 * chunk size, which an image names, never makes us keep more or other;
 * and none longer than the caller lets them lie
 * unused (pages_release_kept, from the engine's and serve's timers).
 * Kept as they are: MADV_FREE would let the kernel take them under
 * pressure, but a buffer used again after it cost ~3 ms per MiB here
 * (the checksum of libc through one: 3.3 ms against 0.35). */
#define KEPT_MAX 8
static struct kept_buffer {
  uint8_t* p;
  size_t len;
  time_t since; /* CLOCK_MONOTONIC seconds */
} kept[KEPT_MAX];
static int nkept;
static pthread_mutex_t kept_mu = PTHREAD_MUTEX_INITIALIZER;

static time_t monotonic_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec;
}

static uint8_t* chunk_buffer(size_t len) {
  uint8_t* p = NULL;
  pthread_mutex_lock(&kept_mu);
  for (int i = nkept - 1; i >= 0; i--)
    if (kept[i].len == len) {
      p = kept[i].p;
      kept[i] = kept[--nkept];
      break;
    }
  pthread_mutex_unlock(&kept_mu);
  if (p) return p;
  p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void chunk_buffer_free(uint8_t* buf, size_t len) {
  if (!buf) return;
  /* Only the sizes used over and over: a page file's chunk size of
   * another kind (an image names it) would take slots the writer's
   * buffers then find full. */
  if (len == WRITE_BUFFER || len == PAGES_CHUNK) {
    pthread_mutex_lock(&kept_mu);
    if (nkept < KEPT_MAX) {
      kept[nkept++] = (struct kept_buffer){buf, len, monotonic_seconds()};
      buf = NULL;
    }
    pthread_mutex_unlock(&kept_mu);
  }
  if (buf) munmap(buf, len);
}

int pages_release_kept(int unused_seconds) {
  struct kept_buffer gone[KEPT_MAX];
  int ngone = 0;
  time_t now = monotonic_seconds();
  pthread_mutex_lock(&kept_mu);
  for (int i = 0; i < nkept;)
    if (now - kept[i].since >= unused_seconds) {
      gone[ngone++] = kept[i];
      kept[i] = kept[--nkept];
    } else {
      i++;
    }
  pthread_mutex_unlock(&kept_mu);
  for (int i = 0; i < ngone; i++) munmap(gone[i].p, gone[i].len);
  return ngone;
}

/* A write buffer, every page of it touched now. Memory touched for the
 * first time is what copying costs most on a VM (each page faulted in,
 * and where the host shadows the guest's page tables or backs its memory
 * on demand, a trap to the host as well): the frozen window should only
 * copy into pages already there. Measured (bench/frozenio, 256 MiB, load
 * ~2): reading /proc/PID/mem into a buffer touched beforehand and write()
 * of it, 85-250 ms; into fresh buffers, 1180 ms; into the page file
 * mapped shared, 700-1250 ms (see map_open). */
static uint8_t* warm_buffer(void) {
  uint8_t* b = chunk_buffer(WRITE_BUFFER);
  if (b) memset(b, 0, WRITE_BUFFER);
  return b;
}

int pages_crc32c_fd(int fd, uint32_t* crc, uint64_t* size) {
  uint8_t* buf = chunk_buffer(PAGES_CHUNK);
  if (!buf) return -ENOMEM;
  uint32_t c = 0;
  uint64_t n = 0;
  int rc = 0;
  for (;;) {
    ssize_t got = read(fd, buf, PAGES_CHUNK);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      rc = -errno;
      break;
    }
    if (got == 0) break;
    c = pages_crc32c(c, buf, (size_t)got);
    n += (uint64_t)got;
  }
  chunk_buffer_free(buf, PAGES_CHUNK);
  *crc = c;
  *size = n;
  return rc;
}

/* Chunks in the file so far: whole ones, and all of them once it is final. */
static size_t sums_whole(const struct pw_sums* s) { return (size_t)(s->written / PAGES_CHUNK); }
static size_t sums_all(const struct pw_sums* s) {
  return (size_t)((s->written + PAGES_CHUNK - 1) / PAGES_CHUNK);
}

/* The least whole chunks worth hashing side by side (sha256x16.c) rather
 * than one after another with the CPU's SHA instructions: sixteen lanes
 * cost the same however many are used. Measured on this project's VM (AMD
 * EPYC, SHA-NI and AVX-512; bench/shalanes, load ~9): 16 lanes 3.0 GB/s
 * in all, one chunk at a time 1.6 GB/s (89 against 169 ms of CPU per 256
 * MiB), so that from 9 chunks on the lanes are cheaper. */
#define SUMS_LANES_MIN 9

/* Set once the sixteen-lane code gave a digest OpenSSL's did not for the
 * same bytes: this process then hashes everything one chunk at a time. */
static int lanes_disagreed;

/* Takes the next chunks to hash (under mu): sixteen whole ones where the
 * 16-lane code runs, else one; once the file is final, what is left (a
 * short last chunk alone). Returns how many, from *first; 0: none yet. */
static size_t sums_take(struct pw_sums* s, size_t* first) {
  size_t whole = sums_whole(s);
  if (s->next >= (s->final ? sums_all(s) : whole)) return 0;
  size_t n = 1;
  if (s->lanes) {
    size_t ready = whole > s->next ? whole - s->next : 0;
    if (ready >= SHA256X16_LANES) n = SHA256X16_LANES;
    /* Before the end, sixteen at a time: fewer wait for more. */
    else if (!s->final) return 0;
    else if (ready >= SUMS_LANES_MIN) n = ready;
  }
  *first = s->next;
  s->next += n;
  return n;
}

/* Bytes of each of sixteen chunks read per pass (a MiB in all, the size of
 * a chunk buffer), hashed while they are in the cache. */
#define LANE_SLICE (PAGES_CHUNK / SHA256X16_LANES)

/* The digests of `n` whole chunks from `first` (2 <= n <= 16), side by side. */
static int sums_lanes(struct pw_sums* s, uint8_t* buf, size_t first, size_t n, uint8_t* out) {
  sha256x16_state st;
  sha256x16_init(&st);
  const uint8_t* p[SHA256X16_LANES];
  for (size_t at = 0; at < PAGES_CHUNK; at += LANE_SLICE) {
    for (size_t j = 0; j < SHA256X16_LANES; j++) {
      if (j >= n) {
        p[j] = p[0]; /* a lane not used: its digest is not taken */
        continue;
      }
      uint64_t from = (uint64_t)(first + j) * PAGES_CHUNK + at;
      if (s->map) {
        p[j] = s->map + from;
      } else {
        int rc = read_mem(s->fd, from, buf + j * LANE_SLICE, LANE_SLICE);
        if (rc) return rc;
        p[j] = buf + j * LANE_SLICE;
      }
    }
    sha256x16_update(&st, p, LANE_SLICE / 64);
  }
  sha256x16_final(&st, PAGES_CHUNK, out, (int)n);
  return 0;
}

struct sums_thread {
  struct pw_sums* s;
  int index;
};

static void* sums_main(void* arg) {
  struct sums_thread* me = arg;
  struct pw_sums* s = me->s;
  int index = me->index;
  free(me);
  /* A file mapped is hashed where it is: no buffer, no copy. */
  uint8_t* buf = s->map ? NULL : chunk_buffer(PAGES_CHUNK);
  pthread_mutex_lock(&s->mu);
  if (!s->map && !buf && !s->err) s->err = -ENOMEM;
  for (;;) {
    size_t i = 0, n = 0;
    while (!s->stop && !s->err && !(s->final && s->next >= sums_all(s))) {
      if (index < s->level && (n = sums_take(s, &i))) break;
      pthread_cond_wait(&s->changed, &s->mu);
    }
    if (!n) break;
    if (i + n > s->cap) {
      size_t ncap = s->cap ? s->cap * 2 : 256;
      while (ncap < i + n) ncap *= 2;
      uint8_t* grown = realloc(s->table, ncap * PAGES_DIGEST);
      if (!grown) {
        s->err = -ENOMEM;
        pthread_cond_broadcast(&s->changed);
        break;
      }
      s->table = grown;
      s->cap = ncap;
    }
    uint64_t from = (uint64_t)i * PAGES_CHUNK;
    size_t len = n > 1 ? n * PAGES_CHUNK
                       : s->written - from < PAGES_CHUNK ? (size_t)(s->written - from) : PAGES_CHUNK;
    pthread_mutex_unlock(&s->mu);
    uint8_t sum[PAGES_DIGEST * SHA256X16_LANES];
    int rc;
    if (n > 1) {
      rc = sums_lanes(s, buf, i, n, sum);
    } else {
      rc = s->map ? pages_sha256(s->map + from, len, sum) : read_mem(s->fd, from, buf, len);
      if (!rc && !s->map) rc = pages_sha256(buf, len, sum);
    }
    /* Nothing reads or writes a hashed chunk through the mapping again:
     * its page table entries go (the pages stay, dirty, in the page
     * cache). While they are mapped, writing each page back must first
     * make it read-only in this process, whose threads run on every core:
     * a TLB shootdown per page, which on a VM made the fsync of a 64 MiB
     * page file take ~800 ms instead of ~50. */
    if (!rc && s->map) madvise((void*)(uintptr_t)(s->map + from), len, MADV_DONTNEED);
    /* Its writing to the disk starts now, so that the fsync before the
     * commit finds little left to do; a chunk is never written again. */
    if (!rc) sync_file_range(s->fd, (off64_t)from, (off64_t)len, SYNC_FILE_RANGE_WRITE);
    pthread_mutex_lock(&s->mu);
    if (rc) {
      if (!s->err) s->err = rc;
    } else {
      memcpy(s->table + i * PAGES_DIGEST, sum, n * PAGES_DIGEST);
      s->done += n;
    }
    pthread_cond_broadcast(&s->changed);
  }
  pthread_mutex_unlock(&s->mu);
  chunk_buffer_free(buf, PAGES_CHUNK);
  return NULL;
}

static struct pw_sums* sums_open(int fd) {
  struct pw_sums* s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->fd = fd;
  s->dir_fd = -1;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->changed, NULL);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  s->max_threads = cores < 1 ? 1 : cores > 8 ? 8 : (int)cores;
  const char* lanes = getenv("APPSHOT_SHA_LANES"); /* =0: one chunk at a time (for measuring) */
  s->lanes = !(lanes && strcmp(lanes, "0") == 0) && !__atomic_load_n(&lanes_disagreed, __ATOMIC_RELAXED) &&
             sha256x16_available();
  return s;
}

/* Lets `level` threads work, starting those not running yet (under mu). */
static void sums_allow(struct pw_sums* s, int level) {
  if (level > s->max_threads) level = s->max_threads;
  if (level > s->level) s->level = level;
  while (s->nthreads < s->level) {
    struct sums_thread* t = malloc(sizeof *t);
    if (!t) break;
    t->s = s;
    t->index = s->nthreads;
    if (pthread_create(&s->threads[s->nthreads], NULL, sums_main, t)) {
      free(t);
      break;
    }
    s->nthreads++;
  }
  /* No thread at all: the finish hashes on the caller's thread. */
  pthread_cond_broadcast(&s->changed);
}

static void sums_published(struct pw_sums* s, uint64_t n) {
  pthread_mutex_lock(&s->mu);
  s->written += n;
  s->landed += n;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->mu);
}

static void sums_join(struct pw_sums* s) {
  for (int t = 0; t < s->nthreads; t++) pthread_join(s->threads[t], NULL);
  s->nthreads = 0;
  if (s->flushing) pthread_join(s->flusher, NULL);
  s->flushing = 0;
}

/* ---- sending the page file to the disk as it is written
 *
 * The fsync that makes an image durable waits for the whole page file to
 * be written back and then for the device to flush its write cache; on
 * this project's VM the flush alone is most of it (the host writing the
 * bytes to its own disk: 150-280 ms for 256 MiB, whether the pages were
 * written back long before or not). Started as the copying starts, the
 * file's pages are written back as soon as they are written
 * (FLUSH_KICK), and every FLUSH_STEP the device is told to flush what it
 * has, so that the disk works while memory is still read and the fsync
 * finds only the last step left (test program, 256 MiB written: what
 * followed the writing 190-210 ms -> 15-150 ms).
 *
 * The flush is the fdatasync of the file's directory, not of the file:
 * past what is written, the file holds the zeros pw_reserve wrote, which
 * an fdatasync of the file would send to the disk too (to be written
 * again with the pages); the directory's, unchanged, costs the device's
 * flush alone (so it is on ext4, by a journal commit; on XFS it flushes
 * nothing). Only a hint: errors are the fsync's to report. The waits of
 * sync_file_range consume the write-back errors of the open file they
 * are made through, so they are made through one of the flusher's own:
 * made through the writer's, a failed write-back was never reported by
 * the final fsync and a page file with holes was committed (review 244,
 * reproduced with a file system that ran out of room and got it back). */
#define FLUSH_KICK (4ull << 20)
#define FLUSH_STEP (32ull << 20)

static void* flusher_main(void* arg) {
  struct pw_sums* s = arg;
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", s->fd);
  int own = open(self, O_RDONLY | O_CLOEXEC);
  int ffd = own >= 0 ? own : s->fd;
  pthread_mutex_lock(&s->mu);
  while (!s->stop && !s->final) {
    uint64_t upto = s->landed;
    if (upto - s->flushed >= FLUSH_STEP) {
      uint64_t from = s->flushed;
      pthread_mutex_unlock(&s->mu);
      sync_file_range(ffd, (off64_t)from, (off64_t)(upto - from),
                      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
      if (s->dir_fd >= 0) fdatasync(s->dir_fd);
      pthread_mutex_lock(&s->mu);
      s->flushed = s->started = upto;
    } else if (upto - s->started >= FLUSH_KICK) {
      uint64_t from = s->started;
      pthread_mutex_unlock(&s->mu);
      sync_file_range(ffd, (off64_t)from, (off64_t)(upto - from), SYNC_FILE_RANGE_WRITE);
      pthread_mutex_lock(&s->mu);
      s->started = upto;
    } else {
      pthread_cond_wait(&s->changed, &s->mu);
    }
  }
  pthread_mutex_unlock(&s->mu);
  if (own >= 0) close(own);
  return NULL;
}

/* Waits for every chunk's digest (the writer is done): 0 or the error. */
static int sums_finish(struct pw_sums* s) {
  pthread_mutex_lock(&s->mu);
  s->final = 1;
  sums_allow(s, s->max_threads);
  size_t total = (size_t)((s->written + PAGES_CHUNK - 1) / PAGES_CHUNK);
  if (!s->nthreads && s->done < total && !s->err) s->err = -EAGAIN;
  while (!s->err && s->done < total) pthread_cond_wait(&s->changed, &s->mu);
  int err = s->err;
  s->stop = 1;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->mu);
  sums_join(s);
  return err;
}

static void sums_free(struct pw_sums* s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  s->stop = 1;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->mu);
  sums_join(s);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->changed);
  if (s->dir_fd >= 0) close(s->dir_fd);
  free(s->table);
  free(s);
}

/* ---- the writer */

/* ---- the writer thread: full buffers, in order, to the file */

struct chunk {
  struct chunk* next;
  struct chunk* hnext; /* in the hashing thread's list (direct) */
  int refs;            /* stages still to see it: writing, hashing */
  uint8_t* buf;
  size_t len;
};

struct pw_queue {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t work, space;
  struct chunk *head, *tail;
  uint8_t** spare; /* buffers written out, for reuse */
  size_t nspare, spare_cap;
  uint64_t queued, limit;
  int done, err, fd;
  struct pw_sums* sums; /* told of each buffer written */
  /* APPSHOT_PAGES_DIRECT=1 (see direct_open): the file opened again with
   * O_DIRECT, written at `offset`; the thread hashes each buffer before
   * writing it (the file's page cache is never made, so there is nothing
   * to read back): `chunk` the digest of the chunk being filled, `chunk_fill`
   * its bytes so far. -1 otherwise. */
  int direct_fd;
  uint64_t offset;
  EVP_MD_CTX* chunk;
  size_t chunk_fill;
  /* A thread of its own hashing the buffers while the writer thread
   * writes them (both only read a buffer; the last one done gives it
   * back): the disk's time and the hashing's overlap. Without it, the
   * writer thread hashes before writing. */
  struct chunk *hhead, *htail;
  pthread_t hasher;
  int hashing;
};

static int write_all(int fd, const uint8_t* p, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, p + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    done += (size_t)n;
  }
  return 0;
}

/* ---- O_DIRECT (APPSHOT_PAGES_DIRECT=1): the page file written from the
 * writer's buffers straight to the disk, no page cache made for it.
 * On this project's VM, memory the kernel takes for the page cache is
 * mostly memory the host had taken back, and each page of it costs a trap
 * to the host when first written: 256 MiB of page cache, 250-600 ms of
 * CPU (perf: copy_folio_from_iter_atomic, in pw_reserve's zeros or in
 * write(); CRIU's splice pays the same in its memcpy when its memory is
 * cold: 122-589 ms of CPU for the same dump, run to run). Written
 * directly, the disk does the copying; the fsync then only flushes. The
 * chunk digests are taken from the buffers, in order, on the writer's
 * thread, since there is no page cache to read them back from. */

/* The digest of the chunk filled so far, published as chunk number
 * sums->next (everything before it is hashed): the hashing threads,
 * which take only chunks past `written`, find nothing to do. */
static int direct_chunk_done(struct pw_queue* q) {
  uint8_t sum[PAGES_DIGEST];
  unsigned int n = 0;
  if (EVP_DigestFinal_ex(q->chunk, sum, &n) != 1 || n != PAGES_DIGEST) return -EIO;
  size_t len = q->chunk_fill;
  q->chunk_fill = 0;
  if (EVP_DigestInit_ex(q->chunk, EVP_sha256(), NULL) != 1) return -EIO;
  struct pw_sums* s = q->sums;
  pthread_mutex_lock(&s->mu);
  size_t i = s->next;
  int rc = 0;
  if (i >= s->cap) {
    size_t ncap = s->cap ? s->cap * 2 : 256;
    while (ncap <= i) ncap *= 2;
    uint8_t* grown = realloc(s->table, ncap * PAGES_DIGEST);
    if (!grown) rc = -ENOMEM;
    else {
      s->table = grown;
      s->cap = ncap;
    }
  }
  if (!rc) {
    memcpy(s->table + i * PAGES_DIGEST, sum, PAGES_DIGEST);
    s->next++;
    s->done++;
    s->written += len;
  } else if (!s->err) {
    s->err = rc;
  }
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

static int direct_hash(struct pw_queue* q, const uint8_t* p, size_t len) {
  while (len) {
    size_t n = PAGES_CHUNK - q->chunk_fill;
    if (n > len) n = len;
    if (EVP_DigestUpdate(q->chunk, p, n) != 1) return -EIO;
    q->chunk_fill += n;
    p += n;
    len -= n;
    if (q->chunk_fill == PAGES_CHUNK) {
      int rc = direct_chunk_done(q);
      if (rc) return rc;
    }
  }
  return 0;
}

/* Hashed, then written at the queue's offset (buffers and lengths are
 * whole pages: what O_DIRECT asks on any file system that takes it). A
 * file system that refuses it here (EINVAL) gets this and the rest
 * through the page cache, at the same offsets. */
static int direct_write(struct pw_queue* q, const uint8_t* p, size_t len) {
  int rc = q->hashing ? 0 : direct_hash(q, p, len);
  if (rc) return rc;
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(q->direct_fd, p + done, len - done, (off_t)(q->offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL && q->direct_fd != q->fd) {
      close(q->direct_fd);
      q->direct_fd = q->fd;
      continue;
    }
    if (n < 0) return -errno;
    if (n == 0) return -ENOSPC;
    done += (size_t)n;
  }
  q->offset += len;
  return 0;
}

/* The page file's descriptor again, with O_DIRECT, when `wanted` (or
 * APPSHOT_PAGES_DIRECT=1; =0: never) and the file system takes it (tmpfs
 * before Linux 6.6 does not):
 * -1 otherwise. */
static int direct_open(int file_fd, int wanted) {
  const char* set = getenv("APPSHOT_PAGES_DIRECT");
  if (set && (*set == '0' || *set == '1')) wanted = *set == '1';
  if (!wanted) return -1;
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", file_fd);
  return open(self, O_WRONLY | O_DIRECT | O_CLOEXEC);
}

/* A stage is done with chunk `c` (under q->mu): the last one gives its
 * buffer back. */
static void chunk_release(struct pw_queue* q, struct chunk* c) {
  if (--c->refs) return;
  q->queued -= c->len;
  if (q->nspare < q->spare_cap) q->spare[q->nspare++] = c->buf;
  else chunk_buffer_free(c->buf, WRITE_BUFFER);
  free(c);
  pthread_cond_broadcast(&q->space);
}

static void* writer_main(void* arg) {
  struct pw_queue* q = arg;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (!q->head && !q->done) pthread_cond_wait(&q->work, &q->mu);
    struct chunk* c = q->head;
    if (!c) break;
    q->head = c->next;
    if (!q->head) q->tail = NULL;
    int failed = q->err;
    pthread_mutex_unlock(&q->mu);
    int rc = failed ? 0 : q->chunk ? direct_write(q, c->buf, c->len) : write_all(q->fd, c->buf, c->len);
    if (!failed && !rc && !q->chunk) sums_published(q->sums, c->len);
    /* Written directly, the digests publish the chunks (direct_chunk_done);
     * what is on the disk is told the flusher alone. */
    if (!failed && !rc && q->chunk) {
      pthread_mutex_lock(&q->sums->mu);
      q->sums->landed += c->len;
      pthread_cond_broadcast(&q->sums->changed);
      pthread_mutex_unlock(&q->sums->mu);
    }
    pthread_mutex_lock(&q->mu);
    if (rc && !q->err) q->err = rc;
    chunk_release(q, c);
  }
  /* The last chunk, short, once everything is written. */
  if (q->chunk && !q->hashing && !q->err && q->chunk_fill) {
    pthread_mutex_unlock(&q->mu);
    int rc = direct_chunk_done(q);
    pthread_mutex_lock(&q->mu);
    if (rc && !q->err) q->err = rc;
  }
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

static void* hasher_main(void* arg) {
  struct pw_queue* q = arg;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (!q->hhead && !q->done) pthread_cond_wait(&q->work, &q->mu);
    struct chunk* c = q->hhead;
    if (!c) break;
    q->hhead = c->hnext;
    if (!q->hhead) q->htail = NULL;
    int failed = q->err;
    pthread_mutex_unlock(&q->mu);
    int rc = failed ? 0 : direct_hash(q, c->buf, c->len);
    pthread_mutex_lock(&q->mu);
    if (rc && !q->err) q->err = rc;
    chunk_release(q, c);
  }
  if (!q->err && q->chunk_fill) {
    pthread_mutex_unlock(&q->mu);
    int rc = direct_chunk_done(q);
    pthread_mutex_lock(&q->mu);
    if (rc && !q->err) q->err = rc;
  }
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

static void queue_free(struct pw_queue* q) {
  for (struct chunk* c = q->head; c;) {
    struct chunk* next = c->next;
    chunk_buffer_free(c->buf, WRITE_BUFFER);
    free(c);
    c = next;
  }
  for (size_t i = 0; i < q->nspare; i++) chunk_buffer_free(q->spare[i], WRITE_BUFFER);
  free(q->spare);
  if (q->direct_fd >= 0 && q->direct_fd != q->fd) close(q->direct_fd);
  EVP_MD_CTX_free(q->chunk);
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->work);
  pthread_cond_destroy(&q->space);
  free(q);
}

/* Stops the thread once everything queued is written (or dropped, with
 * `discard`); returns the first write error. */
static int queue_stop(page_writer* w, int discard) {
  struct pw_queue* q = w->queue;
  if (!q) return 0;
  pthread_mutex_lock(&q->mu);
  if (discard && !q->err) q->err = -ECANCELED;
  q->done = 1;
  pthread_cond_broadcast(&q->work);
  pthread_mutex_unlock(&q->mu);
  pthread_join(q->thread, NULL);
  if (q->hashing) pthread_join(q->hasher, NULL);
  int rc = discard ? 0 : q->err;
  queue_free(q);
  w->queue = NULL;
  return rc;
}

/* The page file mapped: a window of it is the writer's buffer. Pages are
 * copied into the file's page cache directly (the kernel's copy from the
 * application, nothing else), which the hashing threads then read where it
 * is. Every byte of the mapping that is touched is allocated first
 * (fallocate), so that no store into it can fault for want of space
 * (SIGBUS): a full disk is an error returned by fallocate, the application
 * left running, as a failed write() was. */
#define MAP_GRAIN PAGES_CHUNK         /* a window: up to the next chunk boundary */
#define MAP_GROW_MAX (64ull << 20)    /* allocated ahead at most */

/* Only with APPSHOT_PAGES_MAP=1 (and not APPSHOT_PAGES_WRITE=1): no
 * longer the default. Storing into a shared file mapping is the costliest
 * copy there is where page faults are expensive: each page of the window
 * is faulted in (page_mkwrite, its unwritten extent), then the first
 * store into it traps again where the host shadows the page tables, and
 * the write-back must write-protect it. On this project's VM, 256 MiB of
 * a stopped process: 700-1250 ms this way, 85-250 ms read into a warm
 * buffer and written with write() (bench/frozenio, same run), whose page
 * cache pages the kernel fills through its own mapping. */
static int map_open(page_writer* w) {
  const char* off = getenv("APPSHOT_PAGES_WRITE");
  if (off && *off == '1') return -EOPNOTSUPP;
  const char* on = getenv("APPSHOT_PAGES_MAP");
  if (!on || *on != '1') return -EOPNOTSUPP;
  /* One address range for the whole file, whatever its size will be (a
   * shared mapping of a file reserves no memory): each chunk stays where
   * it is until the hashing threads are done with it. */
  static const uint64_t lens[] = {16ull << 40, 1ull << 40, 64ull << 30};
  for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
    void* m = mmap(NULL, lens[i], PROT_READ | PROT_WRITE, MAP_SHARED, w->file_fd, 0);
    if (m == MAP_FAILED) continue;
    /* Where fallocate is not supported, or there is no room for even a
     * chunk, the buffered path (which says why at its first write). */
    if (fallocate(w->file_fd, 0, 0, MAP_GRAIN)) {
      munmap(m, lens[i]);
      if (ftruncate(w->file_fd, 0)) return -errno;
      return -EOPNOTSUPP;
    }
    w->map = m;
    w->map_len = lens[i];
    w->allocated = MAP_GRAIN;
    return 0;
  }
  return -ENOMEM;
}

/* The next window: from `size` to the next chunk boundary, allocated (and
 * then some, up to MAP_GROW_MAX, so that fallocate is not called for every
 * chunk) and populated, so that storing into it cannot fault. */
static int map_window(page_writer* w) {
  uint64_t end = (w->size / MAP_GRAIN + 1) * MAP_GRAIN;
  if (end > w->map_len) return -EFBIG;
  if (end > w->allocated) {
    uint64_t grow = w->allocated < MAP_GROW_MAX ? w->allocated : MAP_GROW_MAX;
    uint64_t want = end + grow > w->map_len ? end : end + grow;
    if (fallocate(w->file_fd, 0, (off_t)w->allocated, (off_t)(want - w->allocated))) {
      /* Perhaps room for this window only. */
      want = end;
      if (fallocate(w->file_fd, 0, (off_t)w->allocated, (off_t)(want - w->allocated))) return -errno;
    }
    w->allocated = want;
  }
  /* Faulted in here, where a failure is an error code: a store into the
   * window then finds its page. (EINVAL: a kernel before 5.14; the stores
   * fault them in.) */
  if (madvise(w->map + w->size, end - w->size, MADV_POPULATE_WRITE) && errno != EINVAL) return -errno;
  w->buf = w->map + w->size;
  w->buf_size = end - w->size;
  w->buf_used = 0;
  return 0;
}

int pw_open(page_writer* w, const char* dir, uint64_t queue_limit, int direct) {
  memset(w, 0, sizeof *w);
  w->file_fd = -1;
  w->mem_fd = -1;
  w->pagemap_fd = -1;
  const char* pin = getenv("APPSHOT_PAGES_PIN"); /* =0: /proc/PID/mem only (for measuring) */
  w->vm_read_off = pin && strcmp(pin, "0") == 0;
  w->file_fd = open(dir, O_RDWR | O_TMPFILE | O_CLOEXEC, 0600);
  if (w->file_fd < 0) return -errno;
  w->sums = sums_open(w->file_fd);
  if (!w->sums) {
    close(w->file_fd);
    w->file_fd = -1;
    return -ENOMEM;
  }
  /* For pw_flush_start's flushes (none without it). */
  w->sums->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (map_open(w) == 0) {
    w->sums->map = w->map;
    int rc = map_window(w);
    if (rc) pw_abort(w);
    return rc;
  }
  w->buf = warm_buffer();
  if (!w->buf) {
    pw_abort(w);
    return -ENOMEM;
  }
  w->buf_size = WRITE_BUFFER;
  if (queue_limit) {
    struct pw_queue* q = calloc(1, sizeof *q);
    if (q) {
      q->fd = w->file_fd;
      q->sums = w->sums;
      q->direct_fd = direct_open(w->file_fd, direct);
      if (q->direct_fd >= 0) {
        q->chunk = EVP_MD_CTX_new();
        if (!q->chunk || EVP_DigestInit_ex(q->chunk, EVP_sha256(), NULL) != 1) {
          close(q->direct_fd);
          q->direct_fd = -1;
        }
      }
      q->limit = queue_limit;
      /* The whole pool now, warm: the reading then waits for a buffer the
       * thread has written rather than touch a new one. */
      uint64_t pool = queue_limit / WRITE_BUFFER;
      q->spare_cap = pool < 2 ? 2 : pool > WRITE_POOL ? WRITE_POOL : (size_t)pool;
      q->spare = calloc(q->spare_cap, sizeof *q->spare);
      while (q->spare && q->nspare + 1 < q->spare_cap) {
        uint8_t* b = warm_buffer();
        if (!b) break;
        q->spare[q->nspare++] = b;
      }
      pthread_mutex_init(&q->mu, NULL);
      pthread_cond_init(&q->work, NULL);
      pthread_cond_init(&q->space, NULL);
      /* No thread (EAGAIN under a pids limit): queue_free gives back the
       * pool made above and its array (emptied first, it read a NULL
       * array's entries). */
      if (q->spare && pthread_create(&q->thread, NULL, writer_main, q) == 0) {
        w->queue = q;
        /* No hashing thread: the writer thread hashes. */
        if (q->chunk && pthread_create(&q->hasher, NULL, hasher_main, q) == 0) q->hashing = 1;
      } else {
        queue_free(q);
      }
    }
    /* Without a thread, writing is synchronous: slower, not wrong. */
  }
  return 0;
}

static const uint8_t zero_page[PAGE];

/* Buffered: the page cache of the file's next `bytes` made now by writing
 * zeros there (from one zero page, many times over: nothing touched on our
 * side), at the place the pages will go, which the copying then writes
 * over (write() from the file's offset, which this leaves where it was).
 * Getting the page cache's pages is most of what write() costs where
 * memory is touched for the first time (or taken back from others): on
 * this project's VM, 256 MiB written into a file 62-1770 ms (load 7-9),
 * 16-117 ms over pages written beforehand (bench/frozenio pw:buffered,
 * same run). A full disk here is no failure of the snapshot (the copying
 * meets it again past what was reserved, and says so); so that it is
 * none of the application's either, the caller reserves at most half of
 * the file system's free space (snapshot/driver.ts reserveRoom). */
static int reserve_written(page_writer* w, uint64_t bytes) {
  enum { ZEROS = 512 };
  static struct iovec zeros[ZEROS];
  if (!zeros[0].iov_base)
    for (int i = 0; i < ZEROS; i++) zeros[i] = (struct iovec){(void*)zero_page, PAGE};
  uint64_t end = (bytes + PAGE - 1) / PAGE * PAGE;
  /* From where the next page goes (what is queued or in the buffer lies
   * before it, written by write() at the file's offset; this moves it
   * not), or from what an earlier call reserved. */
  uint64_t at = w->size + w->buf_used;
  if (w->allocated > at) at = w->allocated;
  while (at < end) {
    uint64_t n = (end - at) / PAGE;
    int cnt = n < ZEROS ? (int)n : ZEROS;
    ssize_t done = pwritev(w->file_fd, zeros, cnt, (off_t)at);
    if (done < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (done == 0) return -ENOSPC;
    at += (uint64_t)done / PAGE * PAGE;
    w->allocated = at;
    if ((uint64_t)done % PAGE) return -ENOSPC;
  }
  return 0;
}

int pw_reserve(page_writer* w, uint64_t bytes) {
  /* Written directly: no page cache to make ahead. */
  if (w->queue && w->queue->direct_fd >= 0) return 0;
  if (!w->map) return reserve_written(w, bytes);
  uint64_t end = (bytes + MAP_GRAIN - 1) / MAP_GRAIN * MAP_GRAIN;
  if (end > w->map_len) end = w->map_len;
  if (end <= w->size + w->buf_used) return 0;
  if (end > w->allocated) {
    /* No room: nothing reserved; the copying says so if it comes to it. */
    if (fallocate(w->file_fd, 0, (off_t)w->allocated, (off_t)(end - w->allocated))) return -errno;
    w->allocated = end;
  }
  uint64_t from = w->size + w->buf_used;
  if (madvise(w->map + from, end - from, MADV_POPULATE_WRITE)) return -errno;
  return 0;
}

/* Mapped: what the window holds is in the file; the hashing threads may
 * take it. */
static void map_publish(page_writer* w) {
  if (!w->buf_used) return;
  w->size += w->buf_used;
  sums_published(w->sums, w->buf_used);
  w->buf_used = 0;
}

static int flush(page_writer* w) {
  if (w->map) {
    map_publish(w);
    return map_window(w);
  }
  if (!w->buf_used) return 0;
  struct pw_queue* q = w->queue;
  if (!q) {
    int rc = write_all(w->file_fd, w->buf, w->buf_used);
    if (rc) return rc;
    sums_published(w->sums, w->buf_used);
  } else {
    struct chunk* c = malloc(sizeof *c);
    if (!c) return -ENOMEM;
    c->next = NULL;
    c->hnext = NULL;
    c->refs = q->hashing ? 2 : 1;
    c->buf = w->buf;
    c->len = w->buf_used;
    pthread_mutex_lock(&q->mu);
    while (!q->err && q->queued && q->queued + c->len > q->limit) pthread_cond_wait(&q->space, &q->mu);
    int err = q->err;
    if (!err) {
      if (q->tail) q->tail->next = c;
      else q->head = c;
      q->tail = c;
      if (q->hashing) {
        if (q->htail) q->htail->hnext = c;
        else q->hhead = c;
        q->htail = c;
      }
      q->queued += c->len;
      pthread_cond_broadcast(&q->work);
    }
    if (err) {
      pthread_mutex_unlock(&q->mu);
      free(c);
      return err;
    }
    /* The next buffer is one the thread is done with (the pool's are all
     * warm); a pool that could not be made whole (no spare at all, and
     * none queued) gets a buffer touched now. */
    while (!q->err && !q->nspare && q->queued) pthread_cond_wait(&q->space, &q->mu);
    uint8_t* next = q->nspare ? q->spare[--q->nspare] : NULL;
    err = q->err;
    pthread_mutex_unlock(&q->mu);
    w->buf = next ? next : err ? NULL : warm_buffer();
    if (err) return err;
    if (!w->buf) return -ENOMEM;
  }
  w->size += w->buf_used;
  w->buf_used = 0;
  return 0;
}

static uint64_t position(const page_writer* w) { return w->size + w->buf_used; }

static int push_pair(uint32_t** arr, size_t* n, size_t* cap, uint32_t first, uint32_t count) {
  /* Extend the last run when this one continues it. */
  if (*n && (*arr)[2 * *n - 2] + (*arr)[2 * *n - 1] == first) {
    (*arr)[2 * *n - 1] += count;
    return 0;
  }
  if (*n == *cap) {
    size_t ncap = *cap ? *cap * 2 : 64;
    uint32_t* grown = realloc(*arr, ncap * 2 * sizeof **arr);
    if (!grown) return -ENOMEM;
    *arr = grown;
    *cap = ncap;
  }
  (*arr)[2 * *n] = first;
  (*arr)[2 * *n + 1] = count;
  (*n)++;
  return 0;
}

int pages_pread_whole(int fd, uint64_t off, void* dst, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(fd, (uint8_t*)dst + done, len - done, (off_t)(off + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r < 0 ? -errno : -ENODATA;
    done += (size_t)r;
  }
  return 0;
}

/* Reads `len` bytes at `addr` of `pid` into `dst`, through /proc/PID/mem:
 * for every page that process_vm_readv must not read (see pin_keeps), for
 * runs too short for it to pay, and for what it leaves unread. A pin
 * (process_vm_readv takes one, FOLL_PIN) makes the kernel (5.19 on) give
 * a process its own copy of a shared copy-on-write anonymous page: reading
 * a forking server that way would multiply its memory by its workers.
 * /proc/PID/mem takes plain references, which leave the sharing alone, and
 * reads mappings the process itself cannot (PROT_NONE) as well. */
static int read_mem(int fd, uint64_t addr, void* dst, size_t len) {
  int rc = pages_pread_whole(fd, addr, dst, len);
  return rc == -ENODATA ? -EIO : rc;
}

static int open_mem(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  return fd < 0 ? -errno : fd;
}

static int read_remote(pid_t pid, uint64_t addr, void* dst, size_t len) {
  int fd = open_mem(pid);
  if (fd < 0) return fd;
  int rc = read_mem(fd, addr, dst, len);
  close(fd);
  return rc;
}

static void close_mem(page_writer* w) {
  if (w->mem_fd >= 0) close(w->mem_fd);
  if (w->pagemap_fd >= 0) close(w->pagemap_fd);
  w->mem_fd = -1;
  w->pagemap_fd = -1;
  w->mem_pid = 0;
}

/* The writer's /proc/PID/mem and /proc/PID/pagemap of `pid`, both opened
 * from one descriptor of /proc/PID: the same process for both, even if the
 * PID were used again between the two opens. */
static int open_process(page_writer* w, pid_t pid) {
  close_mem(w);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d", pid);
  int dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return -errno;
  int fd = openat(dir, "mem", O_RDONLY | O_CLOEXEC);
  int err = errno;
  if (fd >= 0) w->pagemap_fd = openat(dir, "pagemap", O_RDONLY | O_CLOEXEC);
  close(dir);
  if (fd < 0) return -err;
  w->mem_fd = fd;
  w->mem_pid = pid;
  return 0;
}

/* Whether a pagemap entry is a page that a pin leaves where it is: present,
 * anonymous, and mapped by this process alone (not shared copy-on-write
 * with another, which a pin would make the kernel copy; see read_mem). A
 * KSM page mapped once passes too: the pin gives the process a copy of its
 * own (a merged page is never pinned in place), and the merged page, then
 * mapped by no one, is freed: no more memory than before. */
static int pin_keeps(uint64_t pm) {
  return (pm & PM_PRESENT) && (pm & PM_MMAP_EXCLUSIVE) && !(pm & PM_FILE_OR_SHARED);
}

/* Runs of fewer pages than this that a pin keeps are read through
 * /proc/PID/mem with the pages around them: a process_vm_readv costs a
 * system call of its own, which a short run does not earn back (16 is
 * where the two cost the same in bench/pagesread.c: runs of K pages
 * written after a fork between K still shared). */
#define PIN_RUN 16u
#define PINNED_MIN (PIN_RUN * PAGE)

/* `len` bytes at `addr` of the writer's process with process_vm_readv:
 * one copy, the pages looked up a batch at a time, where /proc/PID/mem
 * copies each page twice (into a page of the kernel's, then out to us)
 * and walks the page tables and takes the memory map's lock once per page.
 * Only for pages pin_keeps() says a pin leaves alone. Returns how much it
 * read (the rest is for /proc/PID/mem). */
static size_t read_pinned(page_writer* w, pid_t pid, uint64_t addr, uint8_t* dst, size_t len) {
  struct iovec local = {dst, len}, remote = {(void*)(uintptr_t)addr, len};
  ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (got < 0 && (errno == EPERM || errno == ENOSYS || errno == ESRCH)) w->vm_read_off = 1;
  return got > 0 ? (size_t)got : 0;
}

/* Pages [0, n) at `addr` into `out`, with their pagemap entries `pm`: runs
 * of at least PIN_RUN pages that a pin keeps with process_vm_readv, and
 * everything between them in one /proc/PID/mem read per span.
 * process_vm_readv names the process by its PID, which is only the
 * writer's process while that lives: an entry of its page map read after
 * the last of them, through the descriptor opened on it (which reads
 * nothing once that process's memory is gone), says it lived all along,
 * so that no PID used again was read; else all is read again through
 * /proc/PID/mem (which then fails). */
static int read_batch(page_writer* w, pid_t pid, uint64_t addr, uint8_t* out, size_t n, const uint64_t* pm) {
  size_t from = 0; /* the first page not read yet */
  int pinned = 0;
  for (size_t i = 0; i < n;) {
    if (w->vm_read_off || !pin_keeps(pm[i])) {
      i++;
      continue;
    }
    size_t j = i + 1;
    while (j < n && pin_keeps(pm[j])) j++;
    if (j - i >= PIN_RUN) {
      int rc = i > from ? read_mem(w->mem_fd, addr + from * PAGE, out + from * PAGE, (i - from) * PAGE) : 0;
      if (rc) return rc;
      size_t len = (j - i) * PAGE, got = read_pinned(w, pid, addr + i * PAGE, out + i * PAGE, len);
      pinned |= got > 0;
      if (got < len && (rc = read_mem(w->mem_fd, addr + i * PAGE + got, out + i * PAGE + got, len - got)))
        return rc;
      from = j;
    }
    i = j;
  }
  if (n > from) {
    int rc = read_mem(w->mem_fd, addr + from * PAGE, out + from * PAGE, (n - from) * PAGE);
    if (rc) return rc;
  }
  uint64_t last;
  if (pinned && pread(w->pagemap_fd, &last, sizeof last, (off_t)(addr / PAGE * sizeof last)) != (ssize_t)sizeof last)
    return read_mem(w->mem_fd, addr, out, n * PAGE);
  return 0;
}

/* As read_remote, through the writer's /proc/PID/mem of `pid` (see
 * page_writer.mem_fd), and where runs of pages are this process's alone,
 * with process_vm_readv (read_batch). `pm`: the pages' pagemap entries as
 * the caller read them (the process is stopped), or NULL to read them
 * here. The descriptors stand for the process they were opened on, not
 * for its PID: a PID used again reads nothing. */
static int read_remote_cached(page_writer* w, pid_t pid, uint64_t addr, void* dst, size_t len,
                              const uint64_t* pm) {
  if (w->mem_fd < 0 || w->mem_pid != pid) {
    int rc = open_process(w, pid);
    if (rc) return rc;
  }
  if (w->vm_read_off || w->pagemap_fd < 0 || len < PINNED_MIN || len % PAGE || addr % PAGE)
    return read_mem(w->mem_fd, addr, dst, len);
  if (pm) return read_batch(w, pid, addr, dst, len / PAGE, pm);
  enum { BATCH = 512 };
  uint64_t entries[BATCH];
  uint8_t* out = dst;
  while (len) {
    size_t n = len / PAGE < BATCH ? len / PAGE : BATCH;
    int rc;
    if (pread(w->pagemap_fd, entries, n * sizeof *entries, (off_t)(addr / PAGE * sizeof *entries)) !=
        (ssize_t)(n * sizeof *entries))
      rc = read_mem(w->mem_fd, addr, out, n * PAGE);
    else
      rc = read_batch(w, pid, addr, out, n, entries);
    if (rc) return rc;
    addr += n * PAGE;
    out += n * PAGE;
    len -= n * PAGE;
  }
  return 0;
}

static int wanted(uint64_t pm, pages_mode mode) {
  switch (mode) {
    case PAGES_ANON: return (pm & (PM_PRESENT | PM_SWAPPED)) != 0;
    case PAGES_PRIVATE_FILE:
      /* A swapped page of a private file mapping can only be a written one. */
      return (pm & PM_SWAPPED) || ((pm & PM_PRESENT) && !(pm & PM_FILE_OR_SHARED));
    case PAGES_ALL_PRESENT: return (pm & (PM_PRESENT | PM_SWAPPED)) != 0;
    case PAGES_ALL: return 1;
  }
  return 0;
}

/* The parent's copy of page `idx`, if it has one; `cursor` walks the sorted
 * index as pages are visited in ascending order. */
static const uint8_t* parent_page(const page_writer* w, const pages_parent* p, size_t* cursor,
                                  uint32_t idx) {
  if (!p) return NULL;
  while (*cursor < p->count && p->index[*cursor] < idx) (*cursor)++;
  if (*cursor >= p->count || p->index[*cursor] != idx) return NULL;
  uint32_t f = p->file[*cursor];
  uint64_t off = p->offset[*cursor];
  /* Not off + PAGE > size, which wraps for an offset near 2^64 (a parent
   * image's PageRef: validate.ts bounds it, this does not rely on that). */
  if (f >= w->nparents || off > w->parent_sizes[f] || PAGE > w->parent_sizes[f] - off) return NULL;
  return w->parents[f] + off;
}

/* Whether page idx is in the tracked written pairs; `cursor` walks them. */
static int was_written(const pages_parent* p, size_t* cursor, uint32_t idx) {
  while (*cursor < p->nwritten && p->written[2 * *cursor] + p->written[2 * *cursor + 1] <= idx)
    (*cursor)++;
  return *cursor < p->nwritten && p->written[2 * *cursor] <= idx;
}

/* Copies pages [first, first+count) of the mapping into the buffer, drops
 * those the parent already holds unchanged (and, for anonymous memory,
 * those that are all zeros: absent is the same to a restore, and dirty
 * tracking leaves markers that pagemap counts as swapped pages), and
 * records both kinds of run. */
static int copy_run(page_writer* w, pid_t pid, uint64_t start, uint32_t first, uint32_t count,
                    const uint64_t* pm, const pages_parent* parent, size_t* cursor, pages_result* out,
                    int drop_zero) {
  if (parent && parent->tracked) {
    /* Tracked: unwritten pages the parent holds are not even read. */
    size_t wc = 0;
    uint32_t i = 0;
    while (i < count) {
      /* With no parent index given, tracking is trusted alone: a page not
       * written since the parent is the parent's (or, if the parent did not
       * have it, a page only ever read: zeros). */
      int trust = parent->count == 0;
      uint32_t idx = first + i;
      int keep = !was_written(parent, &wc, idx) && (trust || parent_page(w, parent, cursor, idx));
      uint32_t j = i + 1;
      while (j < count) {
        uint32_t k = first + j;
        int k_keep = !was_written(parent, &wc, k) && (trust || parent_page(w, parent, cursor, k));
        if (k_keep != keep) break;
        j++;
      }
      int rc;
      if (keep) {
        rc = push_pair(&out->same, &out->nsame, &out->same_cap, idx, j - i);
      } else {
        pages_parent untracked = *parent;
        untracked.written = NULL;
        untracked.tracked = 0;
        untracked.count = 0; /* written pages are stored, not compared */
        size_t none = 0;
        rc = copy_run(w, pid, start, idx, j - i, pm ? pm + i : NULL, &untracked, &none, out, drop_zero);
      }
      if (rc) return rc;
      i = j;
    }
    return 0;
  }
  while (count) {
    if (w->buf_used == w->buf_size) {
      int rc = flush(w);
      if (rc) return rc;
    }
    uint32_t room = (uint32_t)((w->buf_size - w->buf_used) / PAGE);
    uint32_t n = count < room ? count : room;
    uint8_t* dst = w->buf + w->buf_used;
    int rc = read_remote_cached(w, pid, start + (uint64_t)first * PAGE, dst, (size_t)n * PAGE, pm);
    if (rc) return rc;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < n; i++) {
      uint8_t* page = dst + (size_t)i * PAGE;
      if (drop_zero && memcmp(page, zero_page, PAGE) == 0) {
        parent_page(w, parent, cursor, first + i); /* keep the cursor in step */
        continue;
      }
      const uint8_t* old = parent_page(w, parent, cursor, first + i);
      if (old && memcmp(old, page, PAGE) == 0) {
        if ((rc = push_pair(&out->same, &out->nsame, &out->same_cap, first + i, 1))) return rc;
        continue;
      }
      if (kept != i) memmove(dst + (size_t)kept * PAGE, page, PAGE);
      kept++;
      if ((rc = push_pair(&out->runs, &out->nruns, &out->runs_cap, first + i, 1))) return rc;
    }
    w->buf_used += (size_t)kept * PAGE;
    out->pages_written += kept;
    first += n;
    if (pm) pm += n;
    count -= n;
  }
  return 0;
}

/* Whether the page at `addr` of `pid` (pagemap entry `mine`) is the page
 * the process it was forked from has at the same address (`theirs`): a
 * private anonymous page still shared copy-on-write. Where pagemap shows
 * page frame numbers (CAP_SYS_ADMIN), they say it; where it hides them,
 * a page neither process maps exclusively, with the same bytes in both, is
 * taken as shared: if it is not the same page, sharing it is still exactly
 * what each process reads. Returns 1, 0, or -errno. */
static int cow_shared(const pages_forked_from* f, pid_t pid, uint64_t addr, uint64_t mine,
                      uint64_t theirs) {
  if (!(mine & PM_PRESENT) || !(theirs & PM_PRESENT)) return 0;
  if ((mine | theirs) & PM_FILE_OR_SHARED) return 0;
  uint64_t a = mine & PM_PFN, b = theirs & PM_PFN;
  if (a || b) return a == b;
  if ((mine | theirs) & PM_MMAP_EXCLUSIVE) return 0;
  static uint8_t page_a[PAGE], page_b[PAGE];
  int rc = read_remote(pid, addr, page_a, PAGE);
  if (!rc) rc = read_remote(f->pid, addr, page_b, PAGE);
  if (rc) return rc;
  return memcmp(page_a, page_b, PAGE) == 0;
}

int pw_dump(page_writer* w, pid_t pid, int pagemap_fd, uint64_t start, uint64_t end,
            pages_mode mode, const pages_parent* parent, const pages_forked_from* forked_from,
            pages_result* out) {
  memset(out, 0, sizeof *out);
  out->data_offset = position(w);
  /* Pages are numbered on 32 bits in an image: a mapping past 16 TiB is
   * refused (memory.ts names it first where it can). */
  if ((end - start) / PAGE > UINT32_MAX) return -EOVERFLOW;
  int no_scan = (mode & PAGES_NO_SCAN) != 0;
  mode = (pages_mode)(mode & ~PAGES_NO_SCAN);
  if (mode != PAGES_ANON) forked_from = NULL;
  uint64_t* pm = malloc(PM_CHUNK * sizeof *pm);
  /* With forked_from: the other process's entries, then per page whether
   * it is shared with it. */
  uint64_t* theirs = forked_from ? malloc(PM_CHUNK * sizeof *theirs) : NULL;
  uint8_t* shared = forked_from ? calloc(PM_CHUNK, 1) : NULL;
  if (!pm || (forked_from && (!theirs || !shared))) {
    free(pm);
    free(theirs);
    free(shared);
    return -ENOMEM;
  }
  uint32_t npages = (uint32_t)((end - start) / PAGE);
  size_t cursor = 0;
  int rc = 0;
  /* Every mode but PAGES_ALL stores only pages present or swapped (uffd-wp
   * markers count as swapped, as pagemap shows them): a chunk starts at
   * the next such page, found with one PAGEMAP_SCAN that passes over page
   * tables never filled in, so that a 1 TiB reservation with a few pages
   * written is not 2 GiB of pagemap read. Without PAGEMAP_SCAN, every
   * chunk is read; so is every chunk of a VM_PFNMAP mapping (PAGES_NO_SCAN),
   * which PAGEMAP_SCAN skips whole while pagemap shows its pages. */
  int skip = mode != PAGES_ALL && !no_scan;
  uint32_t n = 0;
  for (uint32_t base = 0; base < npages && !rc; base += n) {
    if (skip) {
      uint64_t next = 0;
      long found = pages_scan_first(pagemap_fd, start + (uint64_t)base * PAGE, end, &next);
      if (found == 0) break;
      if (found < 0) skip = 0;
      else if (next > start + (uint64_t)base * PAGE) base = (uint32_t)((next - start) / PAGE);
    }
    n = npages - base < PM_CHUNK ? npages - base : PM_CHUNK;
    off_t off = (off_t)((start / PAGE + base) * sizeof *pm);
    ssize_t got = pread(pagemap_fd, pm, n * sizeof *pm, off);
    if (got != (ssize_t)(n * sizeof *pm)) {
      rc = got < 0 ? -errno : -EIO;
      break;
    }
    if (forked_from) {
      got = pread(forked_from->pagemap_fd, theirs, n * sizeof *theirs, off);
      if (got != (ssize_t)(n * sizeof *theirs)) {
        rc = got < 0 ? -errno : -EIO;
        break;
      }
      for (uint32_t i = 0; i < n && !rc; i++) {
        int s = cow_shared(forked_from, pid, start + (uint64_t)(base + i) * PAGE, pm[i], theirs[i]);
        if (s < 0) rc = s;
        shared[i] = s > 0;
      }
      if (rc) break;
    }
    uint32_t i = 0;
    while (i < n && !rc) {
      if (!wanted(pm[i], mode)) {
        i++;
        continue;
      }
      int s = shared && shared[i];
      uint32_t j = i + 1;
      while (j < n && wanted(pm[j], mode) && (shared && shared[j]) == s) j++;
      if (s)
        rc = push_pair(&out->shared, &out->nshared, &out->shared_cap, base + i, j - i);
      else
        rc = copy_run(w, pid, start, base + i, j - i, pm + i, parent, &cursor, out, mode == PAGES_ANON);
      i = j;
    }
  }
  free(pm);
  free(theirs);
  free(shared);
  return rc;
}

long pages_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int reset, uint32_t** out) {
  enum { VEC = 512 };
  struct appshot_page_region vec[VEC];
  uint32_t* pairs = NULL;
  size_t n = 0, cap = 0;
  uint64_t at = start;
  while (at < end) {
    struct appshot_pm_scan_arg arg = {0};
    arg.size = sizeof arg;
    arg.flags = APPSHOT_PM_SCAN_CHECK_WPASYNC | (reset ? APPSHOT_PM_SCAN_WP_MATCHING : 0);
    arg.start = at;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = VEC;
    arg.category_mask = APPSHOT_PAGE_IS_WRITTEN;
    arg.return_mask = APPSHOT_PAGE_IS_WRITTEN;
    long got = ioctl(pagemap_fd, APPSHOT_PAGEMAP_SCAN, &arg);
    if (got < 0) {
      int e = errno;
      free(pairs);
      return -e;
    }
    for (long i = 0; i < got; i++) {
      int rc = push_pair(&pairs, &n, &cap, (uint32_t)((vec[i].start - start) / PAGE),
                         (uint32_t)((vec[i].end - vec[i].start) / PAGE));
      if (rc) {
        free(pairs);
        return rc;
      }
    }
    if (arg.walk_end <= at) break;
    at = arg.walk_end;
  }
  *out = pairs;
  return (long)n;
}

long pages_scan_present(int pagemap_fd, uint64_t start, uint64_t end,
                        struct appshot_page_region** out) {
  size_t n = 0, cap = 256;
  struct appshot_page_region* v = malloc(cap * sizeof *v);
  if (!v) return -ENOMEM;
  uint64_t at = start;
  while (at < end) {
    if (n == cap) {
      struct appshot_page_region* grown = realloc(v, 2 * cap * sizeof *v);
      if (!grown) {
        free(v);
        return -ENOMEM;
      }
      v = grown;
      cap *= 2;
    }
    struct appshot_pm_scan_arg arg = {0};
    arg.size = sizeof arg;
    arg.start = at;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)(v + n);
    arg.vec_len = cap - n;
    arg.category_anyof_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED;
    arg.return_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED | APPSHOT_PAGE_IS_FILE |
                      APPSHOT_PAGE_IS_PFNZERO;
    long got = ioctl(pagemap_fd, APPSHOT_PAGEMAP_SCAN, &arg);
    if (got < 0) {
      int e = errno;
      free(v);
      return -e;
    }
    n += (size_t)got;
    /* Stopped short only when the vector is full: a walk that does not
     * move on is not taken for the whole range. */
    if (arg.walk_end >= end) break;
    if (arg.walk_end <= at) {
      free(v);
      return -EIO;
    }
    at = arg.walk_end;
  }
  *out = v;
  return (long)n;
}

long pages_scan_first(int pagemap_fd, uint64_t start, uint64_t end, uint64_t* first) {
  /* One region is enough: the walk stops at the first page found, and a
   * range whose page tables were never filled in is passed over a table
   * (up to 512 GiB) at a time, where a pagemap read writes 8 bytes for
   * each of its pages. */
  struct appshot_page_region one;
  struct appshot_pm_scan_arg arg = {0};
  arg.size = sizeof arg;
  arg.start = start;
  arg.end = end;
  arg.vec = (uint64_t)(uintptr_t)&one;
  arg.vec_len = 1;
  arg.max_pages = 1;
  arg.category_anyof_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED;
  arg.return_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED;
  long got = ioctl(pagemap_fd, APPSHOT_PAGEMAP_SCAN, &arg);
  if (got < 0) return -errno;
  if (got > 0 && first) *first = one.start;
  return got > 0;
}

long pages_scan_count(int pagemap_fd, uint64_t start, uint64_t end, uint64_t limit) {
  enum { VEC = 256 };
  struct appshot_page_region vec[VEC];
  uint64_t count = 0, at = start;
  while (at < end && count < limit) {
    struct appshot_pm_scan_arg arg = {0};
    arg.size = sizeof arg;
    arg.start = at;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = VEC;
    arg.max_pages = limit - count;
    arg.category_anyof_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED;
    arg.return_mask = APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED;
    long got = ioctl(pagemap_fd, APPSHOT_PAGEMAP_SCAN, &arg);
    if (got < 0) return -errno;
    for (long i = 0; i < got; i++) count += (vec[i].end - vec[i].start) / PAGE;
    if (arg.walk_end <= at) break;
    at = arg.walk_end;
  }
  return (long)(count < limit ? count : limit);
}

long pages_scan_any(int pagemap_fd, uint64_t start, uint64_t end) {
  return pages_scan_first(pagemap_fd, start, end, NULL);
}

/* What pw_dump's wanted() says of a page, from its scan categories. */
static int wanted_scanned(uint64_t c, pages_mode mode) {
  if (mode == PAGES_ANON)
    return (c & (APPSHOT_PAGE_IS_PRESENT | APPSHOT_PAGE_IS_SWAPPED)) && !(c & APPSHOT_PAGE_IS_PFNZERO);
  return (c & APPSHOT_PAGE_IS_SWAPPED) || ((c & APPSHOT_PAGE_IS_PRESENT) && !(c & APPSHOT_PAGE_IS_FILE));
}

int pw_dump_scanned(page_writer* w, pid_t pid, const struct appshot_page_region* regions,
                    size_t nregions, size_t* cursor, uint64_t start, uint64_t end,
                    pages_mode mode, pages_result* out) {
  memset(out, 0, sizeof *out);
  out->data_offset = position(w);
  if (mode != PAGES_ANON && mode != PAGES_PRIVATE_FILE) return -EINVAL;
  while (*cursor < nregions && regions[*cursor].end <= start) (*cursor)++;
  size_t none = 0;
  for (size_t i = *cursor; i < nregions && regions[i].start < end; i++) {
    if (!wanted_scanned(regions[i].categories, mode)) continue;
    uint64_t a = regions[i].start > start ? regions[i].start : start;
    uint64_t b = regions[i].end < end ? regions[i].end : end;
    int rc = copy_run(w, pid, start, (uint32_t)((a - start) / PAGE), (uint32_t)((b - a) / PAGE),
                      NULL, NULL, &none, out, mode == PAGES_ANON);
    if (rc) return rc;
  }
  return 0;
}

int pw_append(page_writer* w, const void* data, size_t len, uint64_t* offset) {
  *offset = position(w);
  const uint8_t* p = data;
  size_t padded = (len + PAGE - 1) / PAGE * PAGE;
  for (size_t done = 0; done < padded;) {
    if (w->buf_used == w->buf_size) {
      int rc = flush(w);
      if (rc) return rc;
    }
    size_t n = w->buf_size - w->buf_used;
    if (n > padded - done) n = padded - done;
    size_t real = done < len ? (len - done < n ? len - done : n) : 0;
    memcpy(w->buf + w->buf_used, p + done, real);
    memset(w->buf + w->buf_used + real, 0, n - real);
    w->buf_used += n;
    done += n;
  }
  return 0;
}

int pw_append_fd(page_writer* w, int fd, uint64_t length, uint32_t** runs, size_t* nruns,
                 uint64_t* offset) {
  *offset = position(w);
  *runs = NULL;
  *nruns = 0;
  /* Pages are numbered on 32 bits in an image: past 16 TiB, refused. */
  if (length / PAGE > UINT32_MAX) return -EOVERFLOW;
  size_t cap = 0;
  off_t pos = 0;
  while ((uint64_t)pos < length) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0 || (uint64_t)data >= length) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole > length) hole = (off_t)length;
    data = data / PAGE * PAGE;
    for (off_t at = data; at < hole;) {
      if (w->buf_used == w->buf_size) {
        int rc = flush(w);
        if (rc) return rc;
      }
      size_t n = w->buf_size - w->buf_used;
      if ((uint64_t)n > (uint64_t)(hole - at)) n = (size_t)(hole - at);
      n = (n + PAGE - 1) / PAGE * PAGE;
      ssize_t r = pread(fd, w->buf + w->buf_used, n, at);
      if (r < 0) return -errno;
      memset(w->buf + w->buf_used + r, 0, n - (size_t)r);
      int rc = push_pair(runs, nruns, &cap, (uint32_t)(at / PAGE), (uint32_t)(n / PAGE));
      if (rc) return rc;
      w->buf_used += n;
      at += (off_t)n;
    }
    pos = hole;
  }
  return 0;
}

/* Bytes the writer has put in the file so far (all of them but what is
 * queued for its thread or still in the current buffer). */
/* The buffer goes (a window of the mapping: the mapping goes, once no
 * hashing thread reads it). */
static void release_buffer(page_writer* w) {
  if (w->map) {
    if (w->sums) {
      /* Hashing threads still at work (a finish that failed) stop first. */
      pthread_mutex_lock(&w->sums->mu);
      w->sums->stop = 1;
      pthread_cond_broadcast(&w->sums->changed);
      pthread_mutex_unlock(&w->sums->mu);
      sums_join(w->sums);
    }
    munmap(w->map, w->map_len);
    w->map = NULL;
    if (w->sums) w->sums->map = NULL;
  } else {
    chunk_buffer_free(w->buf, WRITE_BUFFER);
  }
  w->buf = NULL;
}

uint64_t pw_written(page_writer* w) {
  uint64_t queued = 0;
  struct pw_queue* q = w->queue;
  if (q) {
    pthread_mutex_lock(&q->mu);
    queued = q->queued;
    pthread_mutex_unlock(&q->mu);
  }
  return w->size - queued;
}

/* Hands the current buffer to the writer and waits up to `timeout_ms` for
 * the queue to empty, so that a caller can show the writing as it goes
 * rather than block in pw_finish for all of it. Returns the first write
 * error, or 0 (the queue may still hold data). */
int pw_drain(page_writer* w, int timeout_ms) {
  int rc = flush(w);
  struct pw_queue* q = w->queue;
  if (rc || !q) return rc;
  struct timespec until = deadline_after(timeout_ms);
  pthread_mutex_lock(&q->mu);
  while (!q->err && q->queued && pthread_cond_timedwait(&q->space, &q->mu, &until) == 0) {
  }
  rc = q->err;
  pthread_mutex_unlock(&q->mu);
  return rc;
}

static uint64_t monotonic_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int pw_finish(page_writer* w, int defer_sync) {
  close_mem(w);
  uint64_t t0 = monotonic_ns();
  int rc = 0;
  if (w->map) map_publish(w);
  else rc = flush(w);
  int rc2 = queue_stop(w, rc != 0);
  if (!rc) rc = rc2;
  /* What was allocated ahead goes: the file is what was written (also
   * past `allocated`, where a fallocate that failed halfway may have left
   * some, mapped or not). */
  if (!rc && ftruncate(w->file_fd, (off_t)w->size)) rc = -errno;
  w->allocated = w->size;
  /* Nothing is written through the mapping any more: its page table
   * entries go at once (one TLB flush), so that the fsync below writes
   * the pages back without making each read-only in this process first
   * (see sums_main). The hashing threads still to read a chunk fault it
   * back in read-only, which the writeback need not touch. */
  if (!rc && w->map && w->size) madvise(w->map, (w->size + 4095) & ~(uint64_t)4095, MADV_DONTNEED);
  uint64_t t1 = monotonic_ns();
  /* The sync and the last digests at once: the hashing threads read the
   * page cache while it is written back. Deferred, the fsync runs on its
   * own thread (after the ftruncate above: the size it makes durable is
   * the final one) until pw_synced, beside the digests and the caller's
   * commit work; the caller must wait for it before naming the file
   * where an image's rename could publish it. */
  pthread_mutex_lock(&w->sums->mu);
  w->sums->final = 1;
  sums_allow(w->sums, w->sums->max_threads);
  pthread_mutex_unlock(&w->sums->mu);
  if (!rc && defer_sync) {
    fsync_job_start(&w->file_sync, w->file_fd);
    w->file_sync_pending = 1;
  } else if (!rc && fsync(w->file_fd)) {
    rc = -errno;
  }
  uint64_t t2 = monotonic_ns();
  int rc3 = rc ? 0 : sums_finish(w->sums);
  if (!rc) rc = rc3;
  w->drain_ns = t1 - t0;
  w->fsync_ns = t2 - t1;
  w->hash_wait_ns = monotonic_ns() - t2;
  release_buffer(w);
  return rc;
}

int pw_synced(page_writer* w) {
  if (!w->file_sync_pending) return 0;
  w->file_sync_pending = 0;
  int rc = fsync_job_wait(&w->file_sync);
  w->fsync_ns = w->file_sync.ns;
  return rc;
}

void pw_flush_start(page_writer* w) {
  struct pw_sums* s = w->sums;
  /* Written by the writer thread only: mapped, the mapping's write-back
   * has its own costs (sums_main). With O_DIRECT, only the device's
   * cache is left to flush. */
  if (!s || w->map || !w->queue) return;
  /* Only asked for (APPSHOT_PAGES_FLUSH_AHEAD=1): measured paired by a
   * reviewer (review 244, 256 MiB, load 2.3-4.1), it slowed the copy
   * more than it took from the fsync (wall 475 -> 550 ms with O_DIRECT,
   * 388 -> 424 through the page cache), and fdatasync of a directory
   * flushes nothing on XFS. */
  const char* on = getenv("APPSHOT_PAGES_FLUSH_AHEAD");
  if (!on || *on != '1') return;
  pthread_mutex_lock(&s->mu);
  if (!s->flushing && !s->final && !s->stop && s->dir_fd >= 0 &&
      pthread_create(&s->flusher, NULL, flusher_main, s) == 0)
    s->flushing = 1;
  pthread_mutex_unlock(&s->mu);
}

void pw_hash_start(page_writer* w, int all) {
  if (!w->sums) return;
  pthread_mutex_lock(&w->sums->mu);
  sums_allow(w->sums, all ? w->sums->max_threads : 1);
  pthread_mutex_unlock(&w->sums->mu);
}

const uint8_t* pw_chunk_table(page_writer* w, size_t* nchunks) {
  *nchunks = w->sums ? w->sums->done : 0;
  return w->sums ? w->sums->table : NULL;
}

int pw_link(page_writer* w, const char* path) {
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", w->file_fd);
  /* Following the magic link names the unnamed file; this needs no
   * privilege, unlike AT_EMPTY_PATH. */
  if (linkat(AT_FDCWD, self, AT_FDCWD, path, AT_SYMLINK_FOLLOW)) return -errno;
  return 0;
}

void pw_abort(page_writer* w) {
  /* A deferred fsync still running uses the file's descriptor: joined
   * before it is closed (and perhaps reused). */
  if (w->file_sync_pending) pw_synced(w);
  close_mem(w);
  queue_stop(w, 1);
  sums_free(w->sums);
  w->sums = NULL;
  release_buffer(w);
  if (w->file_fd >= 0) close(w->file_fd);
  w->file_fd = -1;
}

/* ---- checking a page file by chunks, on threads of its own */

/* A chunk's state; CHUNK_BY_LANES is or'ed into CHUNK_GOOD when the
 * sixteen-lane code vouched for it (see check_lanes_disagree). */
enum { CHUNK_PENDING = 0, CHUNK_GOOD = 1, CHUNK_BAD = 2, CHUNK_TAKEN = 3, CHUNK_BY_LANES = 4 };
#define CHUNK_STATE(s) ((s) & 3)

enum { CHECK_THREADS_MAX = 16 };
/* Chunk sizes a check takes (format.ts CHUNK_LIMITS), and the most its
 * threads' buffers may hold together (at least one chunk's). */
#define CHECK_CHUNK_MIN (64u << 10)
#define CHECK_CHUNK_MAX (64u << 20)
#define CHECK_BUFFERS_MAX ((uint64_t)256 << 20)

struct pages_check {
  int fd;
  uint64_t size;
  uint32_t chunk;
  size_t nchunks, nwhole; /* chunks; those of the full size (the lanes') */
  uint8_t* table;
  uint8_t* state; /* CHUNK_* per chunk */
  pthread_mutex_t mu;
  pthread_cond_t changed;
  /* No chunk below lo is pending; none of the whole ones from hi on
   * (the groups are taken from there downwards, see check_take). */
  size_t lo, hi;
  int lanes;         /* whole chunks are hashed up to sixteen side by side */
  uint64_t done;     /* bytes checked */
  uint64_t by_lanes; /* chunks the lanes vouched for (for tests and benches) */
  int stop;          /* stop taking chunks: pages_check_stop, or one failed */
  int failure;       /* the first failure's code (-EBADMSG or -errno) */
  uint64_t bad;      /* and its chunk */
  /* Up to CHECK_THREADS_MAX, and one more started by pages_check_wait
   * when another check found the lanes wrong after these had all ended. */
  pthread_t threads[CHECK_THREADS_MAX + 1];
  int nthreads;
  int live;          /* threads that may still take chunks (not yet ended) */
  uint64_t resets;   /* times check_lanes_disagree put chunks back to pending */
  /* For the test of check_lanes_disagree, faults of the lanes' made up:
   * APPSHOT_TEST_LANES_WRONG=CHUNK, their digest of that chunk wrong;
   * APPSHOT_TEST_LANES_PASS=CHUNK, theirs the table's whatever the bytes.
   * SIZE_MAX: none. Honoured only where test knobs are on (test_knob).
   * The only test hook that could make a changed chunk
   * pass, so it fails closed: once it fired (pass_fired), the check ends
   * good only if the lanes were then found wrong in this process (which
   * puts that chunk back to be checked with OpenSSL), and otherwise
   * fails with -ENOTRECOVERABLE, naming it. */
  size_t lanes_wrong, lanes_pass;
  int pass_fired;
  /* A description of the file of its own, for lseek(SEEK_DATA) (-1: no
   * hole is looked for), which moves the file position the caller's
   * descriptor may share. */
  int seek_fd;
  /* The digest of a whole chunk of zeros, made once a chunk in a hole is
   * met (zero_mu). */
  pthread_mutex_t zero_mu;
  int zero_done;
  uint8_t zero_sum[PAGES_DIGEST];
  /* APPSHOT_TEST_CHECK_HOLD=FILE: no chunk is taken while FILE exists,
   * so that a test can see what waits for the check while it is held
   * (test/pagecheckwait.test.ts). It only delays. NULL: none (or test
   * knobs off: test_knob). */
  char* hold;
};

struct check_thread {
  struct pages_check* c;
  int index;
};

static void check_lanes_disagree(struct pages_check* c);

/* Takes the chunks thread `index` checks next (under mu), into `idx`:
 * how many, 0 when none is left. With the lanes, groups of up to sixteen
 * whole chunks (at least SUMS_LANES_MIN, where the lanes are cheaper):
 * the first thread's from the front, where an eager restore copies each
 * chunk as soon as it is good, the others' from the back, so that the
 * copy waits for one group (the time of sixteen chunks hashed: medians
 * of 6.8-19.9 ms here at load 7.5-10.7) before the first chunk, then
 * rarely. Otherwise, and for what is
 * left (a short last chunk, fewer pending), one at a time from the
 * front. Measured on this project's VM at load ~10 (bench/verify-lanes):
 * 256 MiB checked for 103 ms of CPU this way, 142 with the first thread
 * taking one chunk at a time for the copy's sake, 185 with OpenSSL. */
static size_t check_take(struct pages_check* c, int index, size_t idx[SHA256X16_LANES]) {
  /* Another check of this process found the lanes wrong: this one's
   * chunks on their word are pending again (pages_check_wait does the
   * same once this check's threads have ended). */
  if (c->lanes && __atomic_load_n(&lanes_disagreed, __ATOMIC_ACQUIRE)) check_lanes_disagree(c);
  while (c->lo < c->nchunks && c->state[c->lo] != CHUNK_PENDING) c->lo++;
  if (c->lo >= c->nchunks) return 0;
  if (c->lanes) {
    size_t n = 0;
    if (index > 0) {
      while (c->hi > c->lo && c->state[c->hi - 1] != CHUNK_PENDING) c->hi--;
      for (size_t i = c->hi; i > c->lo && n < SHA256X16_LANES; i--)
        if (c->state[i - 1] == CHUNK_PENDING) idx[n++] = i - 1;
    } else {
      for (size_t i = c->lo; i < c->nwhole && n < SHA256X16_LANES; i++)
        if (c->state[i] == CHUNK_PENDING) idx[n++] = i;
    }
    if (n >= SUMS_LANES_MIN) {
      for (size_t j = 0; j < n; j++) c->state[idx[j]] = CHUNK_TAKEN;
      return n;
    }
  }
  idx[0] = c->lo;
  c->state[c->lo] = CHUNK_TAKEN;
  return 1;
}

/* The digests of whole chunks idx[0..n) of `fd` (chunks of `chunk` bytes,
 * 2 <= n <= 16) side by side, read through `buf` (`chunk` bytes or
 * more): each pass reads a slice of every chunk, at most 64 KiB each,
 * and hashes it while it is in the cache. */
static int chunks_lanes(int fd, uint8_t* buf, uint32_t chunk, const size_t* idx, size_t n,
                        uint8_t* out) {
  size_t slice = chunk / SHA256X16_LANES < LANE_SLICE ? chunk / SHA256X16_LANES : LANE_SLICE;
  sha256x16_state st;
  sha256x16_init(&st);
  const uint8_t* p[SHA256X16_LANES];
  for (size_t at = 0; at < chunk; at += slice) {
    for (size_t j = 0; j < SHA256X16_LANES; j++) {
      if (j >= n) {
        p[j] = p[0]; /* a lane not used: its digest is not taken */
        continue;
      }
      int rc = read_mem(fd, (uint64_t)idx[j] * chunk + at, buf + j * slice, slice);
      if (rc) return rc;
      p[j] = buf + j * slice;
    }
    sha256x16_update(&st, p, slice / 64);
  }
  sha256x16_final(&st, chunk, out, (int)n);
  return 0;
}

/* Chunk i's bytes read into `buf` and hashed with OpenSSL, compared with
 * the table: 0, -EBADMSG, or -errno. */
static int check_one(struct pages_check* c, uint8_t* buf, size_t i) {
  uint64_t off = (uint64_t)i * c->chunk;
  size_t len = c->size - off < c->chunk ? (size_t)(c->size - off) : c->chunk;
  int rc = read_mem(c->fd, off, buf, len); /* a pread loop: -EIO if it ends early */
  uint8_t sum[PAGES_DIGEST];
  if (!rc) rc = pages_sha256(buf, len, sum);
  if (!rc && CRYPTO_memcmp(sum, c->table + i * PAGES_DIGEST, PAGES_DIGEST) != 0) rc = -EBADMSG;
  return rc;
}

/* The lanes and OpenSSL gave a chunk different digests, OpenSSL the
 * table's (under mu; called by the check that found it, and by any other
 * check of the process on its next check_take or pages_check_wait): the
 * lanes are wrong on real data, so none of their verdicts stands. This
 * process stops using them, and every chunk they vouched for in check c
 * is pending again, to be checked one at a time with OpenSSL. What
 * holds: from then on no pages_check_wait of this process reports a
 * chunk good on their word. A wait that returned before they were found
 * wrong cannot be taken back; a restore waits for all its chunks before
 * its application runs, so that is only a restore that had already
 * finished its check. */
static void check_lanes_disagree(struct pages_check* c) {
  __atomic_store_n(&lanes_disagreed, 1, __ATOMIC_RELEASE);
  c->lanes = 0;
  for (size_t i = 0; i < c->nwhole; i++)
    if (c->state[i] == (CHUNK_GOOD | CHUNK_BY_LANES)) {
      c->state[i] = CHUNK_PENDING;
      c->done -= c->chunk;
      if (i < c->lo) c->lo = i;
    }
  c->by_lanes = 0;
  c->resets++;
}

/* Whether whole chunk i lies in a hole of the file (SEEK_DATA finds no
 * data in it): it reads as zeros. Any doubt (lseek unsupported, the
 * short last chunk): no. A sparse page file (a crafted one, its chunk
 * table one digest over and over) is then not read and hashed through
 * its holes, which cost seconds a GiB (review r363 #7). Bytes written
 * into a hole after this look are as bytes written over a chunk already
 * read and hashed: the file is the restorer's (format.ts checkOwner). */
static int chunk_in_hole(struct pages_check* c, size_t i) {
  if (c->seek_fd < 0 || i >= c->nwhole) return 0;
  uint64_t off = (uint64_t)i * c->chunk;
  return pages_data_from(c->seek_fd, off, off + c->chunk) >= off + c->chunk;
}

uint64_t pages_data_from(int seek_fd, uint64_t off, uint64_t end) {
  if (seek_fd < 0 || off >= end || end > (uint64_t)INT64_MAX) return off;
  off_t data = lseek(seek_fd, (off_t)off, SEEK_DATA);
  if (data >= 0) return (uint64_t)data < end ? (uint64_t)data : end;
  /* No data from off to the end: a hole if the end is past `end` (a
   * file cut short meanwhile is read, and fails as such). */
  struct stat st;
  return errno == ENXIO && fstat(seek_fd, &st) == 0 && (uint64_t)st.st_size >= end ? end : off;
}

int pages_seek_fd(int fd) {
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
  int seek_fd = open(self, O_RDONLY | O_CLOEXEC);
  struct stat a, b;
  if (seek_fd >= 0 && (fstat(fd, &a) != 0 || fstat(seek_fd, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)) {
    close(seek_fd);
    seek_fd = -1;
  }
  return seek_fd;
}

/* Chunk i, in a hole, compared with the digest of a whole chunk of zeros
 * (made with OpenSSL in `buf` the first time): 0, -EBADMSG or -errno. */
static int check_hole(struct pages_check* c, uint8_t* buf, size_t i) {
  int rc = 0;
  pthread_mutex_lock(&c->zero_mu);
  if (!c->zero_done) {
    memset(buf, 0, c->chunk);
    rc = pages_sha256(buf, c->chunk, c->zero_sum);
    c->zero_done = !rc;
  }
  pthread_mutex_unlock(&c->zero_mu);
  if (!rc && CRYPTO_memcmp(c->zero_sum, c->table + i * PAGES_DIGEST, PAGES_DIGEST) != 0) rc = -EBADMSG;
  return rc;
}

/* The check's test knobs (APPSHOT_TEST_LANES_WRONG, APPSHOT_TEST_LANES_PASS,
 * APPSHOT_TEST_CHECK_HOLD) weaken or delay it: LANES_PASS lets a chunk pass
 * the lanes uncompared. The resident engine sets each command's APPSHOT_*
 * variables, sent by its client, in its own environment while it serves
 * that command (src/engine/server.ts), and a check started meanwhile (a
 * hosted serve's, another client's) would read them (review r372, finding
 * 2). So they are honoured only in a process started with
 * APPSHOT_TEST_KNOBS=1 in its own environment: looked for in
 * /proc/self/environ, the block the process was started with, which a
 * later setenv does not change. Once that says yes, the knobs' values are
 * read as they are at each check's start (a test changes them between
 * checks). No /proc, or any failure: off. */
static const char* test_knob(const char* name) { return appshot_test_knob(name); /* testknobs.c */ }

/* APPSHOT_TEST_CHECK_HOLD: waits while its file exists (or until the
 * check is stopped). */
static void check_held(struct pages_check* c) {
  if (!c->hold) return;
  while (access(c->hold, F_OK) == 0 && !__atomic_load_n(&c->stop, __ATOMIC_RELAXED)) {
    struct timespec t = {0, 10 * 1000 * 1000};
    nanosleep(&t, NULL);
  }
}

/* Chunk `i` failed its check with `rc` (under mu). Any chunk that fails
 * fails the whole restore: no more are read. The lowest failing chunk is
 * reported, for a stable message, whichever thread found it first. */
static void check_failed(struct pages_check* c, size_t i, int rc) {
  c->state[i] = CHUNK_BAD;
  if (!c->failure || i < c->bad) {
    c->failure = rc;
    c->bad = i;
  }
  c->stop = 1;
}

static void* check_main(void* arg) {
  struct pages_check* c = ((struct check_thread*)arg)->c;
  int index = ((struct check_thread*)arg)->index;
  free(arg);
  uint8_t* buf = chunk_buffer(c->chunk);
  for (;;) {
    size_t idx[SHA256X16_LANES];
    size_t n = 0;
    check_held(c);
    pthread_mutex_lock(&c->mu);
    if (!c->stop && buf) n = check_take(c, index, idx);
    if (!n) {
      if (!buf && !c->failure && !c->stop && c->lo < c->nchunks) {
        /* No memory for a buffer: this chunk cannot be vouched for. */
        c->failure = -ENOMEM;
        c->bad = c->lo;
        c->stop = 1;
      }
      c->live--;
      pthread_cond_broadcast(&c->changed);
      pthread_mutex_unlock(&c->mu);
      break;
    }
    pthread_mutex_unlock(&c->mu);
    /* Those in a hole first, each alone; the others hashed as taken. */
    size_t holes[SHA256X16_LANES];
    int hole_rc[SHA256X16_LANES];
    size_t nholes = 0, kept = 0;
    for (size_t j = 0; j < n; j++) {
      if (chunk_in_hole(c, idx[j])) {
        holes[nholes] = idx[j];
        hole_rc[nholes++] = check_hole(c, buf, idx[j]);
      } else {
        idx[kept++] = idx[j];
      }
    }
    n = kept;
    int rc[SHA256X16_LANES], alone[SHA256X16_LANES] = {0};
    int disagree = 0;
    if (n == 0) {
      /* every one in a hole */
    } else if (n == 1) {
      rc[0] = check_one(c, buf, idx[0]);
    } else {
      uint8_t sums[PAGES_DIGEST * SHA256X16_LANES];
      int r = chunks_lanes(c->fd, buf, c->chunk, idx, n, sums);
      for (size_t j = 0; j < n; j++) {
        if (r) {
          /* A read failed (a file cut short): which chunk, one by one. */
          rc[j] = check_one(c, buf, idx[j]);
          alone[j] = 1;
          continue;
        }
        if (idx[j] == c->lanes_wrong) sums[j * PAGES_DIGEST] ^= 1;
        if (idx[j] == c->lanes_pass) {
          memcpy(sums + j * PAGES_DIGEST, c->table + idx[j] * PAGES_DIGEST, PAGES_DIGEST);
          __atomic_store_n(&c->pass_fired, 1, __ATOMIC_RELAXED);
        }
        rc[j] = 0;
        if (CRYPTO_memcmp(sums + j * PAGES_DIGEST, c->table + idx[j] * PAGES_DIGEST, PAGES_DIGEST) != 0) {
          /* Reported only once OpenSSL's SHA-256 of the same chunk agrees
           * that it does not match: a chunk is refused on the word of the
           * implementation everything else is checked against. */
          rc[j] = check_one(c, buf, idx[j]);
          alone[j] = 1;
          if (!rc[j]) disagree = 1;
        }
      }
    }
    pthread_mutex_lock(&c->mu);
    for (size_t j = 0; j < nholes; j++) {
      size_t i = holes[j];
      if (hole_rc[j]) {
        check_failed(c, i, hole_rc[j]);
      } else {
        c->state[i] = CHUNK_GOOD;
        c->done += c->chunk;
      }
    }
    for (size_t j = 0; j < n; j++) {
      size_t i = idx[j];
      uint64_t off = (uint64_t)i * c->chunk;
      size_t len = c->size - off < c->chunk ? (size_t)(c->size - off) : c->chunk;
      if (rc[j]) {
        check_failed(c, i, rc[j]);
      } else if (n > 1 && !alone[j] && !c->lanes) {
        /* The lanes were found wrong while this group was hashed. */
        c->state[i] = CHUNK_PENDING;
        if (i < c->lo) c->lo = i;
      } else {
        int lanes = n > 1 && !alone[j];
        c->state[i] = lanes ? CHUNK_GOOD | CHUNK_BY_LANES : CHUNK_GOOD;
        c->done += len;
        if (lanes) c->by_lanes++;
      }
    }
    if (disagree) check_lanes_disagree(c);
    pthread_cond_broadcast(&c->changed);
    pthread_mutex_unlock(&c->mu);
  }
  chunk_buffer_free(buf, c->chunk);
  return NULL;
}

/* Starts thread `index` of check c (under mu, so that it counts as live
 * before anyone can see it end): 0, or -errno. */
static int check_spawn(struct pages_check* c, int index) {
  if (c->nthreads >= (int)(sizeof c->threads / sizeof *c->threads)) return -EAGAIN;
  struct check_thread* me = malloc(sizeof *me);
  if (!me) return -ENOMEM;
  me->c = c;
  me->index = index;
  int rc = pthread_create(&c->threads[c->nthreads], NULL, check_main, me);
  if (rc) {
    free(me);
    return -rc;
  }
  c->nthreads++;
  c->live++;
  return 0;
}

pages_check* pages_check_start(int fd, uint64_t size, uint32_t chunk, const uint8_t* table,
                               size_t table_len, int threads, int* err) {
  *err = 0;
  /* The bounds format.ts puts on a manifest's chunk size, here too (the
   * size comes from an image): the lanes' slices divide a power of two
   * of at least 64 KiB, and each thread's buffer is one chunk. */
  if (chunk < CHECK_CHUNK_MIN || chunk > CHECK_CHUNK_MAX || (chunk & (chunk - 1)) ||
      size > UINT64_MAX - chunk || (uint64_t)table_len != (size + chunk - 1) / chunk * PAGES_DIGEST) {
    *err = -EINVAL;
    return NULL;
  }
  struct pages_check* c = calloc(1, sizeof *c);
  if (!c) {
    *err = -ENOMEM;
    return NULL;
  }
  c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  c->size = size;
  c->chunk = chunk;
  c->nchunks = table_len / PAGES_DIGEST;
  c->nwhole = (size_t)(size / chunk);
  c->hi = c->nwhole;
  /* =0: one chunk at a time (for measuring), as the writer's sums_open. */
  const char* lanes = getenv("APPSHOT_SHA_LANES");
  c->lanes = !(lanes && strcmp(lanes, "0") == 0) && !__atomic_load_n(&lanes_disagreed, __ATOMIC_RELAXED) &&
             chunk % (SHA256X16_LANES * 64) == 0 && c->nwhole >= SUMS_LANES_MIN && sha256x16_available();
  const char* wrong = test_knob("APPSHOT_TEST_LANES_WRONG");
  const char* pass = test_knob("APPSHOT_TEST_LANES_PASS");
  c->lanes_wrong = wrong && *wrong ? (size_t)strtoull(wrong, NULL, 10) : SIZE_MAX;
  c->lanes_pass = pass && *pass ? (size_t)strtoull(pass, NULL, 10) : SIZE_MAX;
  c->table = malloc(table_len ? table_len : 1);
  c->state = calloc(c->nchunks ? c->nchunks : 1, 1);
  const char* hold = test_knob("APPSHOT_TEST_CHECK_HOLD");
  c->hold = hold && *hold ? strdup(hold) : NULL;
  if (c->fd < 0 || !c->table || !c->state || (hold && *hold && !c->hold)) {
    *err = c->fd < 0 ? -errno : -ENOMEM;
    if (c->fd >= 0) close(c->fd);
    free(c->table);
    free(c->state);
    free(c->hold);
    free(c);
    return NULL;
  }
  /* The same open file, a description of its own (the magic link of
   * the descriptor just made: that very file, whatever its name now). */
  c->seek_fd = pages_seek_fd(c->fd);
  pthread_mutex_init(&c->zero_mu, NULL);
  memcpy(c->table, table, table_len);
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->changed, NULL);
  if (threads < 1) threads = 1;
  if (threads > CHECK_THREADS_MAX) threads = CHECK_THREADS_MAX;
  /* Each thread reads a whole chunk into a buffer of its own: 16 threads
   * of 64 MiB chunks would touch 1 GiB. */
  if ((uint64_t)threads * chunk > CHECK_BUFFERS_MAX) threads = (int)(CHECK_BUFFERS_MAX / chunk);
  if ((size_t)threads > c->nchunks) threads = (int)c->nchunks;
  pthread_mutex_lock(&c->mu);
  for (int t = 0; t < threads; t++) check_spawn(c, t);
  pthread_mutex_unlock(&c->mu);
  if (c->nchunks && !c->nthreads) {
    *err = -EAGAIN;
    pages_check_stop(c);
    return NULL;
  }
  return c;
}

int pages_check_wait(pages_check* c, uint64_t off, uint64_t len, int timeout_ms, uint64_t* bad) {
  if (off > c->size) off = c->size;
  if (len > c->size - off) len = c->size - off;
  size_t first = (size_t)(off / c->chunk);
  size_t end = len ? (size_t)((off + len + c->chunk - 1) / c->chunk) : first;
  struct timespec until = timeout_ms >= 0 ? deadline_after(timeout_ms) : (struct timespec){0, 0};
  int rc = 0;
  pthread_mutex_lock(&c->mu);
  uint64_t resets = c->resets;
  for (size_t i = first; i < end;) {
    if (c->failure) {
      rc = c->failure;
      *bad = c->bad;
      break;
    }
    /* Another check of this process found the lanes wrong, perhaps after
     * this one's threads had ended: what they vouched for here is not
     * good either. */
    if (c->by_lanes && __atomic_load_n(&lanes_disagreed, __ATOMIC_ACQUIRE)) check_lanes_disagree(c);
    /* Chunks were put back to pending (here or by a thread), perhaps
     * behind i: the range is scanned again from its start. */
    if (c->resets != resets) {
      resets = c->resets;
      i = first;
      /* No thread is left to take them: one is started (not checked here,
       * which would hold the caller past its timeout for the whole file,
       * Ctrl-C unheard); if it cannot be, the check fails rather than
       * leave chunks unchecked. */
      if (!c->live && !c->stop && c->lo < c->nchunks) {
        int err = check_spawn(c, 0);
        if (err) {
          c->failure = err;
          c->bad = c->lo;
          c->stop = 1;
          pthread_cond_broadcast(&c->changed);
        }
      }
      continue;
    }
    if (CHUNK_STATE(c->state[i]) == CHUNK_GOOD) {
      i++;
      continue;
    }
    /* Stopped with this chunk never taken: it will not be checked. */
    if (c->stop && c->state[i] == CHUNK_PENDING) {
      rc = -ECANCELED;
      *bad = i;
      break;
    }
    if (timeout_ms < 0) pthread_cond_wait(&c->changed, &c->mu);
    else if (pthread_cond_timedwait(&c->changed, &c->mu, &until) == ETIMEDOUT) {
      rc = 1;
      break;
    }
  }
  /* APPSHOT_TEST_LANES_PASS passed a chunk and the lanes were not found
   * wrong: that chunk stands on a made-up word, so nothing is good. */
  if (!rc && __atomic_load_n(&c->pass_fired, __ATOMIC_RELAXED) &&
      !__atomic_load_n(&lanes_disagreed, __ATOMIC_ACQUIRE)) {
    if (!c->failure) {
      c->failure = -ENOTRECOVERABLE;
      c->bad = c->lanes_pass;
      c->stop = 1;
      pthread_cond_broadcast(&c->changed);
    }
    rc = c->failure;
    *bad = c->bad;
  }
  pthread_mutex_unlock(&c->mu);
  return rc;
}

uint64_t pages_check_by_lanes(pages_check* c) {
  pthread_mutex_lock(&c->mu);
  uint64_t n = c->by_lanes;
  pthread_mutex_unlock(&c->mu);
  return n;
}

uint64_t pages_check_done(pages_check* c) {
  pthread_mutex_lock(&c->mu);
  uint64_t done = c->done;
  pthread_mutex_unlock(&c->mu);
  return done;
}

void pages_check_stop(pages_check* c) {
  pthread_mutex_lock(&c->mu);
  c->stop = 1;
  pthread_cond_broadcast(&c->changed);
  pthread_mutex_unlock(&c->mu);
  for (int t = 0; t < c->nthreads; t++) pthread_join(c->threads[t], NULL);
  close(c->fd);
  if (c->seek_fd >= 0) close(c->seek_fd);
  pthread_mutex_destroy(&c->mu);
  pthread_mutex_destroy(&c->zero_mu);
  pthread_cond_destroy(&c->changed);
  free(c->table);
  free(c->state);
  free(c->hold);
  free(c);
}
