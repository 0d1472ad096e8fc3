/*
 * appshot translation tables: see appshot_table.h for the model.
 *
 * This file is compiled into the preload library (inside other people's
 * programs), the init process and the Node addon. Rules that follow from
 * that: no allocation, no stdio, no global constructors, and every lookup
 * path must stay async-signal-safe.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "appshot_table.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static long raw_kill(long pid, long sig) { return appshot_raw_syscall(SYS_kill, pid, sig, 0, 0, 0, 0); }

static const char *const kind_names[APPSHOT_KINDS] = {
    "pid", "semid", "shmid", "msgid", "semkey", "shmkey", "msgkey", "port"};

const char *appshot_kind_name(enum appshot_kind kind) {
  return (unsigned)kind < APPSHOT_KINDS ? kind_names[kind] : "?";
}

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

static inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static inline uint64_t make_pair(int32_t vid, int32_t sid) {
  return ((uint64_t)(uint32_t)vid << 32) | (uint32_t)sid;
}
static inline int32_t pair_vid(uint64_t p) { return (int32_t)(uint32_t)(p >> 32); }
static inline int32_t pair_sid(uint64_t p) { return (int32_t)(uint32_t)p; }

/* An entry's pair is stored inverted, so that zeroes (a new file, whose
 * pages are not even allocated until written) are FREE entries. */
static inline uint64_t entry_pair(const struct appshot_entry *e) { return ~LOAD(&e->stored); }
static inline void set_entry_pair(struct appshot_entry *e, uint64_t p) { STORE(&e->stored, ~p); }

/* Where each table's arrays are and how large, from the layout (layout()
 * below computes the same): never from the file's own copy of them (kind,
 * capacity, index_size, the offsets), which the application can overwrite
 * at any moment, and which the engine, init and the CLI would then follow
 * too: an offset of its choosing had the engine read anywhere (SIGSEGV at
 * entries_off = 2^40), a capacity of 0 divide by zero. The copy is written
 * when the file is made, for whoever inspects it. `t` is always
 * &h->tables[kind]. */
static inline uint32_t kind_of(const struct appshot_header *h, const struct appshot_table *t) {
  return (uint32_t)(t - h->tables);
}
static inline uint32_t capacity_of(enum appshot_kind kind) {
  return kind == APPSHOT_PID ? APPSHOT_PID_CAPACITY : APPSHOT_IPC_CAPACITY;
}
static inline uint32_t cap_of(const struct appshot_header *h, const struct appshot_table *t) {
  return capacity_of((enum appshot_kind)kind_of(h, t));
}
/* Cells in each hash index: twice the capacity (a power of two). */
static inline uint32_t cells_of(const struct appshot_header *h, const struct appshot_table *t) {
  return 2 * cap_of(h, t);
}
/* Bytes of one table per entry of capacity: the entry and its four index
 * cells (two generations of the two indexes). */
#define TABLE_BYTES_PER_ENTRY (sizeof(struct appshot_entry) + 4 * 2 * sizeof(uint32_t))
static inline uint64_t entries_offset(uint32_t kind) {
  uint64_t off = (sizeof(struct appshot_header) + 63) & ~63ull;
  if (kind > APPSHOT_PID)
    off += (uint64_t)APPSHOT_PID_CAPACITY * TABLE_BYTES_PER_ENTRY +
           (uint64_t)(kind - 1) * APPSHOT_IPC_CAPACITY * TABLE_BYTES_PER_ENTRY;
  return off;
}
static inline struct appshot_entry *entries_of(const struct appshot_header *h,
                                               const struct appshot_table *t) {
  return (struct appshot_entry *)((char *)h + entries_offset(kind_of(h, t)));
}
/* Generation `gen` of an index: the vindex of gen 0, its sindex, then gen 1's. */
static inline uint32_t *index_of(const struct appshot_header *h,
                                 const struct appshot_table *t, uint32_t gen, int by_sid) {
  uint64_t cap = cap_of(h, t), cells = 2 * cap;
  uint64_t off = entries_offset(kind_of(h, t)) + cap * sizeof(struct appshot_entry) +
                 ((gen & 1u) * 2 + (by_sid ? 1 : 0)) * cells * sizeof(uint32_t);
  return (uint32_t *)((char *)h + off);
}
static inline uint32_t *vindex_of(const struct appshot_header *h,
                                  const struct appshot_table *t, uint32_t gen) {
  return index_of(h, t, gen, 0);
}
static inline uint32_t *sindex_of(const struct appshot_header *h,
                                  const struct appshot_table *t, uint32_t gen) {
  return index_of(h, t, gen, 1);
}

/* --- Layout -------------------------------------------------------------- */

uint32_t appshot_capacity(enum appshot_kind kind) { return capacity_of(kind); }
uint64_t appshot_entries_offset(enum appshot_kind kind) { return entries_offset(kind); }

/* Where struct appshot_waits starts: after the last table's arrays (where
 * a table after the last would start). */
static uint64_t waits_offset(void) {
  return (entries_offset(APPSHOT_KINDS) + 63) & ~63ull;
}

/* Where struct appshot_ipc_pids starts: after the waits (version 13). */
static uint64_t ipc_pids_offset(void) {
  return (waits_offset() + sizeof(struct appshot_waits) + 63) & ~63ull;
}

static uint64_t layout(struct appshot_header *h) {
  uint64_t off = (sizeof(*h) + 63) & ~63ull;
  for (int k = 0; k < APPSHOT_KINDS; k++) {
    uint32_t cap = capacity_of((enum appshot_kind)k);
    uint32_t cells = cap * 2;
    if (h) {
      struct appshot_table *t = &h->tables[k];
      t->kind = (uint32_t)k;
      t->capacity = cap;
      t->index_size = cells;
      t->entries_off = off;
    }
    off += (uint64_t)cap * sizeof(struct appshot_entry);
    for (int gen = 0; gen < 2; gen++) {
      if (h) h->tables[k].vindex_off[gen] = off;
      off += (uint64_t)cells * sizeof(uint32_t);
      if (h) h->tables[k].sindex_off[gen] = off;
      off += (uint64_t)cells * sizeof(uint32_t);
    }
  }
  off = ipc_pids_offset() + sizeof(struct appshot_ipc_pids);
  return (off + 4095) & ~4095ull;
}

struct appshot_waits *appshot_waits_of(const struct appshot_header *h) {
  return (struct appshot_waits *)((char *)h + waits_offset());
}

struct appshot_ipc_pids *appshot_ipc_pids_of(const struct appshot_header *h) {
  return (struct appshot_ipc_pids *)((char *)h + ipc_pids_offset());
}

uint64_t appshot_ipc_pids_offset(void) { return ipc_pids_offset(); }

int appshot_ipc_pid_recorded(const struct appshot_header *h, enum appshot_kind kind,
                             int32_t sid, uint32_t field, int32_t shown,
                             int32_t *vpid) {
  const struct appshot_ipc_pids *p = appshot_ipc_pids_of(h);
  /* `count` is the application's to overwrite: bounded. */
  uint32_t n = LOAD(&p->count);
  if (n > APPSHOT_IPC_PID_SLOTS) n = APPSHOT_IPC_PID_SLOTS;
  for (uint32_t i = 0; i < n; i++) {
    const struct appshot_ipc_pid *e = &p->pid[i];
    /* kind first, acquired: appshot_ipc_pids_forget clears it alone. */
    if (LOAD(&e->kind) == (uint16_t)kind && e->sid == sid && e->field == field &&
        e->shown == shown) {
      *vpid = e->vpid;
      return 1;
    }
  }
  return 0;
}

void appshot_ipc_pids_forget(struct appshot_header *h, enum appshot_kind kind, int32_t sid) {
  struct appshot_ipc_pids *p = appshot_ipc_pids_of(h);
  uint32_t n = LOAD(&p->count);
  if (n > APPSHOT_IPC_PID_SLOTS) n = APPSHOT_IPC_PID_SLOTS;
  for (uint32_t i = 0; i < n; i++) {
    struct appshot_ipc_pid *e = &p->pid[i];
    /* One store of the kind: a reader sees the entry whole or no match. */
    if (LOAD(&e->kind) == (uint16_t)kind && e->sid == sid)
      STORE(&e->kind, (uint16_t)APPSHOT_IPC_PID_FORGOTTEN);
  }
}

/* Virtual id ranges. PIDs: 1 is the application's init (bound, not
 * allocated); the rest cycle like the kernel's, so a freed id is not handed
 * out again soon. IPC ids start at 0 as the kernel's do. Keys are never
 * allocated: the application chooses them. */
static void virtual_range(enum appshot_kind kind, int32_t *vmin, int32_t *vmax) {
  switch (kind) {
    case APPSHOT_PID: *vmin = 2; *vmax = 4194303; break; /* PID_MAX_LIMIT - 1 */
    case APPSHOT_SEMID:
    case APPSHOT_SHMID:
    case APPSHOT_MSGID: *vmin = 0; *vmax = 0x3fffffff; break;
    default: *vmin = 0; *vmax = -1; break;
  }
}

/* Whether the places readers compute (entries_of, index_of, cap_of) are
 * the ones layout() writes into a new file: checked as each file is made,
 * so that the two can never drift apart unseen. */
static int layout_agrees(void) {
  static struct appshot_header x;
  layout(&x);
  for (int k = 0; k < APPSHOT_KINDS; k++) {
    const struct appshot_table *t = &x.tables[k];
    if (t->capacity != cap_of(&x, t) || t->index_size != cells_of(&x, t) ||
        t->entries_off != (uint64_t)((char *)entries_of(&x, t) - (char *)&x))
      return 0;
    for (uint32_t gen = 0; gen < 2; gen++)
      if (t->vindex_off[gen] != (uint64_t)((char *)vindex_of(&x, t, gen) - (char *)&x) ||
          t->sindex_off[gen] != (uint64_t)((char *)sindex_of(&x, t, gen) - (char *)&x))
        return 0;
  }
  /* The last table's arrays end where the waits begin, or before. */
  const struct appshot_table *last = &x.tables[APPSHOT_KINDS - 1];
  return (uint64_t)((char *)sindex_of(&x, last, 1) - (char *)&x) +
             (uint64_t)cells_of(&x, last) * sizeof(uint32_t) <= waits_offset();
}

struct appshot_header *appshot_table_create(const char *path, const char *aid,
                                            uint64_t key_salt) {
  if (!layout_agrees()) {
    errno = EPROTO;
    return NULL;
  }
  size_t aid_len = strlen(aid);
  if (aid_len == 0 || aid_len > APPSHOT_AID_MAX) {
    errno = ENAMETOOLONG;
    return NULL;
  }
  int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return NULL;
  uint64_t size = layout(NULL);
  if (ftruncate(fd, (off_t)size) != 0) goto fail;
  struct appshot_header *h =
      mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (h == MAP_FAILED) goto fail;
  close(fd);

  /* The file is all zeroes, and no page of it is written but the first:
   * every index cell is already EMPTY, every entry FREE (stored inverted,
   * see entry_pair). Writing the entries' FREE was 300 pages of tmpfs
   * allocated and zeroed per application, 1.2 MiB held for its life. */
  layout(h);
  memcpy(h->aid, aid, aid_len);
  h->key_salt = key_salt;
  h->size = (uint32_t)size;
  for (int k = 0; k < APPSHOT_KINDS; k++) {
    struct appshot_table *t = &h->tables[k];
    virtual_range((enum appshot_kind)k, &t->vmin, &t->vmax);
    t->vnext = t->vmin;
  }
  /* The lock word is 0, free, as the file was made. */
  h->version = APPSHOT_TABLE_VERSION;
  STORE(&h->magic, APPSHOT_TABLE_MAGIC); /* last: the file is ready */
  return h;

fail: {
  int saved = errno;
  close(fd);
  unlink(path);
  errno = saved;
  return NULL;
}
}

struct appshot_header *appshot_table_map_fd(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return NULL;
  uint64_t size = layout(NULL);
  if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != size) {
    errno = EPROTO;
    return NULL;
  }
  struct appshot_header *h =
      mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (h == MAP_FAILED) return NULL;
  if (LOAD(&h->magic) != APPSHOT_TABLE_MAGIC ||
      h->version != APPSHOT_TABLE_VERSION || h->size != size) {
    munmap(h, size);
    errno = EPROTO;
    return NULL;
  }
  return h;
}

struct appshot_header *appshot_table_open(const char *path) {
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return NULL;
  struct appshot_header *h = appshot_table_map_fd(fd);
  int saved = errno;
  close(fd);
  errno = saved;
  return h;
}

int appshot_tables_fd_base(void) {
  struct rlimit lim;
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return 64;
  if (lim.rlim_cur >= 1024) return 1000;
  return lim.rlim_cur >= 16 ? (int)(lim.rlim_cur * 3 / 4) : 3;
}

uint64_t appshot_table_bytes(void) { return layout(NULL); }

void appshot_table_close(struct appshot_header *h) {
  /* The layout's size, which every mapping has (appshot_table_map_fd
   * refuses a file of another), never the file's `size` field: the
   * application may have written another there since, and munmap would
   * take that much of whatever follows the mapping (and a shrunk file's
   * field is a SIGBUS to read). */
  if (h) munmap(h, (size_t)layout(NULL));
}

/* --- Lookups ------------------------------------------------------------- */

/* Whether entry `e` of table `t` is a key reserved for a create: in the
 * array, in no index, translated through by nobody. Only the key tables
 * have such entries: the bit means nothing in the others (the file is the
 * application's to write). */
static int reserved_entry(const struct appshot_header *h,
                          const struct appshot_table *t,
                          const struct appshot_entry *e) {
  const enum appshot_kind k = (enum appshot_kind)kind_of(h, t);
  return k >= APPSHOT_SEMKEY && k <= APPSHOT_MSGKEY &&
         (LOAD(&e->flags) & APPSHOT_F_RESERVED);
}

/* Walks one index for `id`; `by_sid` says which half of the pair to compare.
 * Returns the entry's pair, or FREE; *slot_out gets the entry's slot. A
 * miss is only believed if no rebuild happened during the walk. */
static uint64_t probe(const struct appshot_header *h,
                      const struct appshot_table *t, int by_sid, int32_t id,
                      uint32_t *slot_out) {
  const struct appshot_entry *e = entries_of(h, t);
  const uint32_t cells = cells_of(h, t), capacity = cap_of(h, t), mask = cells - 1;
  for (int attempt = 0; attempt < 8; attempt++) {
    uint32_t flips = LOAD(&t->flips);
    const uint32_t *idx = by_sid ? sindex_of(h, t, flips & 1u)
                                 : vindex_of(h, t, flips & 1u);
    uint32_t i = mix32((uint32_t)id) & mask;
    for (uint32_t n = 0; n < cells; n++, i = (i + 1) & mask) {
      uint32_t c = LOAD(&idx[i]);
      if (c == APPSHOT_CELL_EMPTY) break;
      if (c == APPSHOT_CELL_TOMB || c > capacity) continue;
      uint64_t p = entry_pair(&e[c - 1]);
      if (p == APPSHOT_PAIR_FREE) continue;
      /* A cell left over from the slot's last entry may lead to a key
       * reserved there since (its flag stored before its pair): no
       * answer, as if the cell were gone. */
      if (reserved_entry(h, t, &e[c - 1])) continue;
      if ((by_sid ? pair_sid(p) : pair_vid(p)) == id) {
        if (slot_out) *slot_out = c - 1;
        return p;
      }
    }
    if (LOAD(&t->flips) == flips) break;
  }
  return APPSHOT_PAIR_FREE;
}

int appshot_v2s(const struct appshot_header *h, enum appshot_kind kind,
                int32_t vid, int32_t *out) {
  uint64_t p = probe(h, &h->tables[kind], 0, vid, NULL);
  if (p == APPSHOT_PAIR_FREE) return 0;
  *out = pair_sid(p);
  return 1;
}

int appshot_s2v(const struct appshot_header *h, enum appshot_kind kind,
                int32_t sid, int32_t *out) {
  uint64_t p = probe(h, &h->tables[kind], 1, sid, NULL);
  if (p == APPSHOT_PAIR_FREE) return 0;
  *out = pair_vid(p);
  return 1;
}

int appshot_s2flags(const struct appshot_header *h, enum appshot_kind kind,
                    int32_t sid, uint32_t *flags) {
  const struct appshot_table *t = &h->tables[kind];
  uint32_t slot;
  if (probe(h, t, 1, sid, &slot) == APPSHOT_PAIR_FREE) return 0;
  *flags = LOAD(&entries_of(h, t)[slot].flags);
  return 1;
}

int appshot_entry_at(const struct appshot_header *h, enum appshot_kind kind,
                     uint32_t slot, int32_t *vid, int32_t *sid,
                     uint32_t *flags, int32_t *owner) {
  const struct appshot_table *t = &h->tables[kind];
  if (slot >= cap_of(h, t)) return 0;
  const struct appshot_entry *e = &entries_of(h, t)[slot];
  uint64_t p = entry_pair(e);
  if (p == APPSHOT_PAIR_FREE) return 0;
  *vid = pair_vid(p);
  *sid = pair_sid(p);
  if (flags) *flags = LOAD(&e->flags);
  if (owner) *owner = LOAD(&e->owner);
  return 1;
}

/* The lock word: 0 while nobody holds it; a holder's TID (with the waiter
 * and owner-died bits) otherwise. */
static int lock_free(const struct appshot_header *h) {
  return __atomic_load_n(&h->lock, __ATOMIC_ACQUIRE) == 0;
}

void appshot_scan_begin(const struct appshot_header *h, enum appshot_kind kind,
                        struct appshot_scan *sc) {
  const struct appshot_table *t = &h->tables[kind];
  sc->left = UINT32_MAX;
  sc->live = sc->hint = 0;
  if (!lock_free(h)) return;
  sc->live = __atomic_load_n(&t->live, __ATOMIC_RELAXED);
  sc->hint = __atomic_load_n(&t->slot_hint, __ATOMIC_RELAXED);
  sc->left = sc->live;
}

int appshot_scan_over(const struct appshot_header *h, enum appshot_kind kind,
                      struct appshot_scan *sc) {
  if (sc->left != 0) return 0;
  const struct appshot_table *t = &h->tables[kind];
  if (lock_free(h) && __atomic_load_n(&t->live, __ATOMIC_RELAXED) == sc->live &&
      __atomic_load_n(&t->slot_hint, __ATOMIC_RELAXED) == sc->hint)
    return 1;
  sc->left = UINT32_MAX;
  return 0;
}

/* --- Locking and repair -------------------------------------------------- */

/* Fills generation `gen` of both indexes of a table from its entries. */
static void fill_indexes(struct appshot_header *h, struct appshot_table *t,
                         uint32_t gen) {
  uint32_t *vi = vindex_of(h, t, gen), *si = sindex_of(h, t, gen);
  const uint32_t cells = cells_of(h, t), capacity = cap_of(h, t);
  memset(vi, 0, cells * sizeof(uint32_t));
  memset(si, 0, cells * sizeof(uint32_t));
  struct appshot_entry *e = entries_of(h, t);
  uint32_t mask = cells - 1, live = 0;
  /* Each walk bounded by the index's size: the application writes the
   * same file, and may fill cells while this runs. */
  for (uint32_t s = 0; s < capacity; s++) {
    uint64_t p = entry_pair(&e[s]);
    if (p == APPSHOT_PAIR_FREE) continue;
    live++;
    /* A key reserved for a create is in the array, holding its slot, but
     * in no index: nobody translates through a key whose object may not
     * exist (settle_reservations commits or drops it). */
    if (reserved_entry(h, t, &e[s])) continue;
    uint32_t i = mix32((uint32_t)pair_vid(p)) & mask, n = 0;
    while (vi[i] != APPSHOT_CELL_EMPTY && ++n < cells) i = (i + 1) & mask;
    vi[i] = s + 1;
    i = mix32((uint32_t)pair_sid(p)) & mask, n = 0;
    while (si[i] != APPSHOT_CELL_EMPTY && ++n < cells) i = (i + 1) & mask;
    si[i] = s + 1;
  }
  t->live = live;
}

/* Rebuilds a table's indexes into the idle generation, then publishes it.
 * Readers in the old generation finish their walk undisturbed. */
static void rebuild(struct appshot_header *h, struct appshot_table *t) {
  fill_indexes(h, t, (t->flips + 1u) & 1u);
  t->tombs = 0;
  STORE(&t->flips, t->flips + 1u);
}

static void settle_reservations(struct appshot_header *h);

/* --- The writer lock -------------------------------------------------------
 *
 * Not glibc's robust mutex (it was, up to layout 11). A robust
 * pthread_mutex_t links itself into its holder's robust list by pointers
 * kept inside the mutex (__list.__next and __prev), and glibc's unlock
 * takes it out again by writing through them (next->prev = prev,
 * prev->next = next). This file is the application's to write: every
 * privileged process that took the lock (the engine, the CLI, often as
 * root, appshot-init) wrote what the application chose where it chose,
 * and at its thread's exit the kernel walked a list the application had
 * linked. Here the file holds one 32-bit word, and nothing in the file is
 * ever followed as an address, by us or by the kernel.
 *
 * The word keeps the kernel's robust-futex protocol (its value is what
 * the kernel reads and writes at a holder's death): 0 free; else the
 * holder's system TID in FUTEX_TID_MASK, FUTEX_WAITERS while a locker
 * sleeps on it (FUTEX_WAIT; the unlock then wakes one), FUTEX_OWNER_DIED
 * and no TID once the kernel saw its holder die. A word with no TID is
 * taken by a compare-and-swap; one with OWNER_DIED is taken and repaired
 * (repair_locked), the old EOWNERDEAD.
 *
 * The holder's death. The kernel marks a word only if the dying thread's
 * robust list names it. The lock is not linked into the list (the links
 * are what put pointers in the file): while it is taken and held, the
 * thread's robust_list_head.list_op_pending names it. The head is the
 * thread's own (glibc's, in its thread descriptor; get_robust_list says
 * where); the entry is &word - head->futex_offset, so that the kernel,
 * which adds futex_offset to the entry, lands on the word. At the
 * thread's exit, and at an exec, the kernel (exit_robust_list and
 * handle_futex_death, kernel/futex/core.c) walks glibc's list as it
 * always does, then handles the pending entry by reading the 32-bit word
 * at entry + futex_offset and nothing else: the entry itself is never
 * read as a list node. If the word names the dying thread it becomes
 * OWNER_DIED (WAITERS kept) and a waiter is woken; if it is 0 (the thread
 * died just after letting go, or a woken waiter died before taking it)
 * one waiter is woken, which takes it. Any other word is left alone. So
 * the file's bytes never steer a write of ours or the kernel's: the one
 * word is compare-and-swapped in place. The head's previous pending value
 * is put back at the unlock: a signal handler that takes this lock may
 * have interrupted glibc halfway through one of its own robust-mutex
 * operations, whose pending entry is then there.
 *
 * The constraint: glibc sets list_op_pending around each of its own
 * robust-mutex operations and sets it back to NULL after. A thread that
 * holds this lock must make no such call (its death while holding would
 * then go unmarked by the kernel, and be found only by the waiters' look
 * at the holder, below). None does: a holder runs this
 * file's code and raw system calls (and the addon's object creation,
 * addon_restore.cc), with every signal blocked, so no handler of the
 * application runs in between.
 *
 * A TID is the one the kernel compares, gettid()'s (not a libc's cached
 * one, nor the preload library's virtual one), asked again at each
 * attempt: a waiter frozen by a snapshot and restored has a new one. And
 * asked once more after the take: a locker stopped between its gettid and
 * its compare-and-swap, and restored, took the word under its old TID,
 * which no thread has; the word is then put under the new one (retag).
 *
 * Holders the kernel never marks. It handles the pending entry only after
 * walking the dying thread's whole robust list, and gives up on the first
 * entry it cannot read or handle: a thread that dies holding a glibc
 * robust mutex in a page it unmapped, say, leaves our word naming it for
 * ever. So does a holder with no robust list (a vfork or posix_spawn
 * child, a raw clone: get_robust_list says NULL, and pend_lock names
 * nothing). So waiters look for themselves: they sleep at most
 * HOLDER_CHECK_MS at a time, and a word left unchanged through such a
 * sleep has its holder probed by a raw kill(TID, 0) (the preload library
 * wraps kill() and would translate the TID; kill() takes any thread's TID,
 * not only a process's). Only ESRCH says dead: the word is then marked
 * FUTEX_OWNER_DIED, as the kernel would have, and taken and repaired as
 * usual. EPERM (another user's thread, root's) says alive. The limits:
 * every locker sees the TIDs of the others (one PID namespace: a process
 * of the application in one of its own is refused, resources/process.ts);
 * a dead holder's TID taken by a new thread only means waiting until that
 * one is gone too. A holder killed and not reaped yet (its parent busy,
 * or waiting for this very lock), or a thread-group leader that exited
 * while its other threads run, is a zombie: kill() still finds it, so
 * its /proc/TID/stat is read too (is_zombie). The same
 * bounded sleep covers a lost wake: an unlock wakes one sleeper, and one
 * woken and killed before it took the word passes the wake to nobody
 * (the kernel wakes another only if the word is 0 at its death, and a
 * fresh locker may have taken the word without FUTEX_WAITERS meanwhile);
 * the others then look again within HOLDER_CHECK_MS. */

/* The calling thread's system TID. */
static uint32_t own_tid(void) {
  return (uint32_t)appshot_raw_syscall(SYS_gettid, 0, 0, 0, 0, 0, 0) & FUTEX_TID_MASK;
}

/* Names the lock word as the calling thread's pending robust operation
 * (see above), keeping what was there in `held`. A thread without a
 * robust list (none registered, or get_robust_list refused) holds the
 * lock without: its death is then found by the waiters' own look at the
 * holder (lock_word), not by the kernel. */
static void pend_lock(struct appshot_header *h, struct appshot_held *held) {
  struct robust_list_head *head = NULL;
  size_t len = 0;
  held->robust_head = NULL;
  held->pending_was = NULL;
  if (appshot_raw_syscall(SYS_get_robust_list, 0, (long)&head, (long)&len, 0, 0, 0) != 0 ||
      !head || len != sizeof *head)
    return;
  uintptr_t entry = (uintptr_t)&h->lock - (uintptr_t)head->futex_offset;
  if (entry & 1u) return; /* bit 0 of an entry says priority-inheritance */
  held->robust_head = head;
  held->pending_was = head->list_op_pending;
  __atomic_store_n(&head->list_op_pending, (struct robust_list *)entry, __ATOMIC_RELAXED);
  /* Named before the word is taken, in program order: the kernel reads
   * the head only when this same thread exits. */
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* Puts back the pending entry pend_lock found, once the word is let go. */
static void unpend_lock(const struct appshot_held *held) {
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  struct robust_list_head *head = held->robust_head;
  if (head)
    __atomic_store_n(&head->list_op_pending, (struct robust_list *)held->pending_was,
                     __ATOMIC_RELAXED);
}

static long futex_op(uint32_t *word, long op, uint32_t val, const struct timespec *until) {
  return appshot_raw_syscall(SYS_futex, (long)word, op, (long)val, (long)until, 0,
                             op == FUTEX_WAIT_BITSET ? (long)FUTEX_BITSET_MATCH_ANY : 0);
}

/* What taking the word found. */
#define LOCK_TAKEN 0
#define LOCK_TAKEN_DEAD 1 /* its last holder died holding it */

/* How long a waiter sleeps before it looks at the word's holder itself. */
#define HOLDER_CHECK_MS 1000

/* One try at taking the word, whose value was `seen`: LOCK_TAKEN or
 * LOCK_TAKEN_DEAD, or -1 (it changed meanwhile, or names a holder).
 * `waiters` (FUTEX_WAITERS or 0) is kept in the word: a locker that has
 * slept may have left others asleep, whom its unlock must wake. */
static int take_word(struct appshot_header *h, uint32_t seen, uint32_t tid, uint32_t waiters) {
  if (seen & FUTEX_TID_MASK) return -1;
  uint32_t want = tid | ((seen | waiters) & FUTEX_WAITERS);
  if (!__atomic_compare_exchange_n(&h->lock, &seen, want, 0, __ATOMIC_ACQUIRE,
                                   __ATOMIC_RELAXED))
    return -1;
  return seen & FUTEX_OWNER_DIED ? LOCK_TAKEN_DEAD : LOCK_TAKEN;
}

/* The word was just taken under `tid`: if the calling thread's TID is no
 * longer that (stopped between its gettid and the take, and restored),
 * puts the word under its TID now, keeping the other bits a waiter may
 * have added. A word that no longer names `tid` is left alone: only a
 * writer of the file can have put that there. */
static void retag(struct appshot_header *h, uint32_t tid) {
  const uint32_t now = own_tid();
  if (now == tid) return;
  uint32_t seen = __atomic_load_n(&h->lock, __ATOMIC_RELAXED);
  while ((seen & FUTEX_TID_MASK) == tid &&
         !__atomic_compare_exchange_n(&h->lock, &seen, now | (seen & ~FUTEX_TID_MASK), 0,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

/* "/proc/<pid>/<leaf>" into buf (64 bytes), without stdio. */
static void proc_path(char *buf, pid_t pid, const char *leaf) {
  char digits[16];
  int n = 0;
  unsigned int v = (unsigned int)pid;
  do digits[n++] = (char)('0' + v % 10);
  while ((v /= 10) && n < (int)sizeof digits);
  memcpy(buf, "/proc/", 6);
  char *p = buf + 6;
  while (n) *p++ = digits[--n];
  *p++ = '/';
  size_t l = strlen(leaf);
  memcpy(p, leaf, l + 1);
}

/* Whether thread `tid` has exited but is still there to be reaped: a
 * process whose parent has not waited for it yet, or a thread-group
 * leader that ended before its other threads. Its /proc/TID/stat says Z
 * (or X) after the command name; read with raw calls, on the stack (this
 * runs inside the application, once a HOLDER_CHECK_MS sleep at most). No
 * /proc, or no such file: not known to be one (0). A limit: for the
 * moment between its open and its close the waiter holds a descriptor of
 * /proc/TID/stat, which a snapshot that stops it just then (outside a
 * window: its thread's exit) finds among the process's descriptors and
 * refuses as another thread's /proc file; process_vm_readv, which says
 * ESRCH of a zombie without a descriptor, says the same of a live
 * process of another user, and so cannot stand in. */
static int is_zombie(long tid) {
  char path[64];
  proc_path(path, (pid_t)tid, "stat");
  const long fd = appshot_raw_syscall(SYS_openat, AT_FDCWD, (long)path, O_RDONLY | O_CLOEXEC, 0, 0, 0);
  if (fd < 0) return 0;
  /* "TID (COMM) S ...": COMM is at most 15 bytes, so the state is within
   * the first 64, and nothing after it holds a ')'. */
  char buf[64];
  const long got = appshot_raw_syscall(SYS_read, fd, (long)buf, sizeof buf, 0, 0, 0);
  appshot_raw_syscall(SYS_close, fd, 0, 0, 0, 0, 0);
  for (long i = got - 3; i >= 0; i--)
    if (buf[i] == ')' && buf[i + 1] == ' ') return buf[i + 2] == 'Z' || buf[i + 2] == 'X';
  return 0;
}

/* Whether the thread the word `seen` names is gone (see above): a raw
 * kill(TID, 0) says ESRCH, or it is a zombie (is_zombie: a dead holder
 * nobody has reaped yet answers kill as if alive). Anything else says it
 * is there. */
static int holder_gone(uint32_t seen) {
  const long tid = (long)(seen & FUTEX_TID_MASK);
  return tid && (raw_kill(tid, 0) == -ESRCH || is_zombie(tid));
}

/* The word still `seen`, naming a holder that is gone: marks it as the
 * kernel would have at the holder's death (FUTEX_OWNER_DIED, FUTEX_WAITERS
 * kept), for the next take to repair. Nothing if it changed meanwhile. */
static void mark_gone(struct appshot_header *h, uint32_t seen) {
  __atomic_compare_exchange_n(&h->lock, &seen, FUTEX_OWNER_DIED | (seen & FUTEX_WAITERS), 0,
                              __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static int before(const struct timespec *a, const struct timespec *b) {
  return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* `t` moved `ms` milliseconds on. */
static void add_ms(struct timespec *t, unsigned ms) {
  t->tv_sec += ms / 1000;
  t->tv_nsec += (long)(ms % 1000) * 1000000L;
  if (t->tv_nsec >= 1000000000L) {
    t->tv_sec++;
    t->tv_nsec -= 1000000000L;
  }
}

/* Takes the word, sleeping while another holds it, until `until`
 * (CLOCK_MONOTONIC) if given. LOCK_TAKEN, LOCK_TAKEN_DEAD, or -errno:
 * EDEADLK (the word names this very thread: nobody would ever let go),
 * ETIMEDOUT. */
static int lock_word(struct appshot_header *h, const struct timespec *until) {
  uint32_t waited = 0;
  for (;;) {
    const uint32_t tid = own_tid();
    uint32_t seen = __atomic_load_n(&h->lock, __ATOMIC_RELAXED);
    int rc = take_word(h, seen, tid, waited);
    if (rc >= 0) {
      retag(h, tid);
      return rc;
    }
    struct timespec now;
    if (until) {
      /* Asked at every pass, before anything else: a word that changes
       * each time (the application's to write) never lets the wait
       * begin, nor a take succeed. */
      clock_gettime(CLOCK_MONOTONIC, &now);
      if (!before(&now, until)) {
        /* A wake this locker took and leaves unused goes on to the next
         * sleeper, who would otherwise sleep through a free lock. */
        if (waited) futex_op(&h->lock, FUTEX_WAKE, 1, NULL);
        return -ETIMEDOUT;
      }
    }
    if (!(seen & FUTEX_TID_MASK)) continue; /* changed under us: again */
    if ((seen & FUTEX_TID_MASK) == tid) return -EDEADLK;
    if (!(seen & FUTEX_WAITERS)) {
      uint32_t expected = seen;
      if (!__atomic_compare_exchange_n(&h->lock, &expected, seen | FUTEX_WAITERS, 0,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        continue;
      seen |= FUTEX_WAITERS;
    }
    waited = FUTEX_WAITERS;
    /* Never for ever, deadline or not: the holder may be gone unmarked.
     * Without a deadline (the preload library's case) the sleep is
     * relative, and no clock is read. */
    struct timespec wake = {0, 0};
    long op = FUTEX_WAIT;
    if (until) {
      wake = now;
      op = FUTEX_WAIT_BITSET; /* absolute, CLOCK_MONOTONIC */
    }
    add_ms(&wake, HOLDER_CHECK_MS);
    if (until && before(until, &wake)) wake = *until;
    /* Returns when woken, when the word is no longer `seen`, at a signal
     * (only SIGSTOP and the like get through) or at `wake`: each time,
     * the word is looked at again. Unchanged through a whole sleep, its
     * holder is looked at too. (Timed, an interrupted wait goes on as
     * restart_syscall: src/ptrace/windows.ts waitsForTableLock.) */
    if (futex_op(&h->lock, op, seen, &wake) == -ETIMEDOUT &&
        __atomic_load_n(&h->lock, __ATOMIC_RELAXED) == seen && holder_gone(seen))
      mark_gone(h, seen);
  }
}

/* Lets the word go; wakes one sleeper if any. */
static void unlock_word(struct appshot_header *h) {
  uint32_t was = __atomic_exchange_n(&h->lock, 0, __ATOMIC_RELEASE);
  if (was & FUTEX_WAITERS) futex_op(&h->lock, FUTEX_WAKE, 1, NULL);
}

/* How long appshot_lock waits for the lock, in ms; 0: for ever. */
static unsigned lock_patience_ms;

void appshot_set_lock_patience(unsigned ms) { lock_patience_ms = ms; }

/* Whether a hold of the lock leaves SIGBUS and SIGSEGV unblocked
 * (appshot_set_lock_spares_faults). */
static int lock_spares_faults;

void appshot_set_lock_spares_faults(int on) { lock_spares_faults = on; }

/* Every signal, for a hold of the lock; less the faults' if asked. */
static void lock_mask(sigset_t *all) {
  sigfillset(all);
  if (lock_spares_faults) {
    sigdelset(all, SIGBUS);
    sigdelset(all, SIGSEGV);
  }
}

/* The word named a dead holder: a writer died inside its critical
 * section. The entry arrays are written before the indexes, so they are
 * the truth: every index is rebuilt from them and a dead creator's
 * reservation settled. */
static void repair_locked(struct appshot_header *h) {
  for (int k = 0; k < APPSHOT_KINDS; k++) rebuild(h, &h->tables[k]);
  settle_reservations(h);
  h->repairs++;
}

int appshot_repair_if_dead(struct appshot_header *h) {
  struct appshot_held held;
  sigset_t all;
  lock_mask(&all);
  pthread_sigmask(SIG_SETMASK, &all, &held.mask);
  /* Never waits: see the header. Settled here as in any of the
   * application's processes: the witness is the creator the header
   * records (struct appshot_creating), never the caller, and the object's
   * record is read by raw calls that root or the creator's user may make
   * (IPC_STAT, else *_STAT_ANY: made_by_creator); the adoption maps and
   * binds as the creator would have. */
  pend_lock(h, &held);
  const uint32_t tid = own_tid();
  int rc = -1;
  /* Bounded: a word the application keeps changing is busy. A word that
   * names a thread which is gone (see the lock's comment) is a dead
   * holder's, the kernel's mark or not: the application could as well
   * have written FUTEX_OWNER_DIED there itself, so this grants it nothing
   * (the probe is a kill(TID, 0), which sends nothing). */
  for (int n = 0; n < 64 && rc < 0; n++) {
    uint32_t seen = __atomic_load_n(&h->lock, __ATOMIC_RELAXED);
    if (seen & FUTEX_TID_MASK) {
      if (!holder_gone(seen)) break;
      mark_gone(h, seen);
      continue;
    }
    rc = take_word(h, seen, tid, 0);
  }
  if (rc >= 0) retag(h, tid);
  if (rc < 0) {
    unpend_lock(&held);
    pthread_sigmask(SIG_SETMASK, &held.mask, NULL);
    errno = EBUSY;
    return -1;
  }
  if (rc == LOCK_TAKEN_DEAD) repair_locked(h);
  appshot_unlock(h, &held);
  return rc == LOCK_TAKEN_DEAD;
}

int appshot_lock(struct appshot_header *h, struct appshot_held *held) {
  sigset_t all;
  lock_mask(&all);
  pthread_sigmask(SIG_SETMASK, &all, &held->mask);
  struct timespec until, *deadline = NULL;
  if (lock_patience_ms) {
    clock_gettime(CLOCK_MONOTONIC, &until);
    add_ms(&until, lock_patience_ms);
    deadline = &until;
  }
  /* Named before the word is taken: a death right after the take is seen. */
  pend_lock(h, held);
  int rc = lock_word(h, deadline);
  if (rc < 0) {
    /* EDEADLK: a word naming this thread, which only a writer of the
     * file can have put there; ETIMEDOUT: held past the patience
     * (appshot_set_lock_patience). */
    unpend_lock(held);
    pthread_sigmask(SIG_SETMASK, &held->mask, NULL);
    errno = -rc;
    return -1;
  }
  if (rc == LOCK_TAKEN_DEAD) repair_locked(h);
  return 0;
}

void appshot_unlock(struct appshot_header *h, const struct appshot_held *held) {
  unlock_word(h);
  unpend_lock(held);
  pthread_sigmask(SIG_SETMASK, &held->mask, NULL);
}

/* --- Writes (lock held) -------------------------------------------------- */

static void index_insert(const struct appshot_header *h, struct appshot_table *t,
                         uint32_t *idx, int32_t id, uint32_t slot) {
  const uint32_t cells = cells_of(h, t), mask = cells - 1;
  uint32_t i = mix32((uint32_t)id) & mask, n = 0;
  /* Bounded: live entries fill at most half the cells, but the file is the
   * application's to fill. */
  while (idx[i] != APPSHOT_CELL_EMPTY && idx[i] != APPSHOT_CELL_TOMB && ++n < cells)
    i = (i + 1) & mask;
  if (idx[i] == APPSHOT_CELL_TOMB) t->tombs--;
  STORE(&idx[i], slot + 1);
}

/* Finds the cell of `slot` in an index by walking from id's hash. */
static void index_remove(const struct appshot_header *h, struct appshot_table *t,
                         uint32_t *idx, int32_t id, uint32_t slot) {
  const uint32_t cells = cells_of(h, t), mask = cells - 1;
  uint32_t i = mix32((uint32_t)id) & mask;
  for (uint32_t n = 0; n < cells; n++, i = (i + 1) & mask) {
    if (idx[i] == APPSHOT_CELL_EMPTY) return;
    if (idx[i] == slot + 1) {
      if (idx[(i + 1) & mask] != APPSHOT_CELL_EMPTY) {
        STORE(&idx[i], APPSHOT_CELL_TOMB);
        t->tombs++;
        return;
      }
      /* The walk of every id through here ends at the next cell, so this
       * one, and the tombstones just before it, can end it instead: no
       * reader, even one walking now, could find anything past them.
       * Without this, each fork and reap leaves tombstones that every
       * lookup of an id not in the table (a new child) must walk. */
      STORE(&idx[i], APPSHOT_CELL_EMPTY);
      /* Bounded: it ends at cell i, emptied above, unless the application
       * writes tombstones into its file as fast as they go. */
      uint32_t k = 0;
      for (uint32_t j = (i - 1) & mask; idx[j] == APPSHOT_CELL_TOMB && ++k < cells;
           j = (j - 1) & mask) {
        STORE(&idx[j], APPSHOT_CELL_EMPTY);
        t->tombs--;
      }
      return;
    }
  }
}

/* Stores (vid, sid) in a free slot of the entry array, which *slot_out
 * receives, and counts it; the caller indexes it (or, for a reservation,
 * does not yet). */
static int store_entry_locked(struct appshot_header *h, struct appshot_table *t,
                              int32_t vid, int32_t sid, uint32_t flags,
                              int32_t owner, uint32_t *slot_out) {
  const uint32_t capacity = cap_of(h, t);
  if (t->live >= capacity) {
    errno = ENOSPC;
    return -1;
  }
  /* Tombstones make misses walk further; clear them out well before the
   * index fills up. The indexes are twice the capacity, so live entries
   * alone never load them past one half. */
  if (t->tombs > cells_of(h, t) / 4) rebuild(h, t);

  struct appshot_entry *e = entries_of(h, t);
  uint32_t slot = t->slot_hint % capacity, n = 0;
  while (entry_pair(&e[slot]) != APPSHOT_PAIR_FREE) {
    /* Every slot taken though the count said otherwise (the file is the
     * application's to write): full. */
    if (++n >= capacity) {
      errno = ENOSPC;
      return -1;
    }
    slot = (slot + 1) % capacity;
  }
  t->slot_hint = slot + 1;

  /* Entry first, then the indexes: a writer that dies in between leaves an
   * entry that the repair re-indexes, never an index cell to nothing. */
  STORE(&e[slot].flags, flags);
  STORE(&e[slot].owner, owner);
  set_entry_pair(&e[slot], make_pair(vid, sid));
  t->live++;
  *slot_out = slot;
  return 0;
}

static void index_slot_locked(struct appshot_header *h, struct appshot_table *t,
                              int32_t vid, int32_t sid, uint32_t slot) {
  uint32_t gen = t->flips & 1u;
  index_insert(h, t, vindex_of(h, t, gen), vid, slot);
  index_insert(h, t, sindex_of(h, t, gen), sid, slot);
}

static int insert_locked(struct appshot_header *h, struct appshot_table *t,
                         int32_t vid, int32_t sid, uint32_t flags,
                         int32_t owner) {
  uint32_t slot;
  if (store_entry_locked(h, t, vid, sid, flags, owner, &slot) != 0) return -1;
  index_slot_locked(h, t, vid, sid, slot);
  return 0;
}

static void remove_slot_locked(struct appshot_header *h, struct appshot_table *t,
                               uint32_t slot) {
  struct appshot_entry *e = &entries_of(h, t)[slot];
  uint64_t p = entry_pair(e);
  if (p == APPSHOT_PAIR_FREE) return;
  if (!reserved_entry(h, t, e)) {
    uint32_t gen = t->flips & 1u;
    index_remove(h, t, vindex_of(h, t, gen), pair_vid(p), slot);
    index_remove(h, t, sindex_of(h, t, gen), pair_sid(p), slot);
  }
  set_entry_pair(e, APPSHOT_PAIR_FREE);
  t->live--;
}

static int slot_of_sid(const struct appshot_header *h,
                       const struct appshot_table *t, int32_t sid,
                       uint32_t *slot) {
  return probe(h, t, 1, sid, slot) != APPSHOT_PAIR_FREE;
}

static int unmap_locked(struct appshot_header *h, struct appshot_table *t,
                        int32_t sid) {
  uint32_t slot;
  if (!slot_of_sid(h, t, sid, &slot)) return 0;
  struct appshot_entry *e = entries_of(h, t);
  uint32_t flags = e[slot].flags;
  remove_slot_locked(h, t, slot);
  if (kind_of(h, t) == APPSHOT_PID && (flags & APPSHOT_F_THREADS)) {
    /* The process is gone, so are its threads: their TIDs are free in the
     * system again and must not stay reachable through old virtual ids. */
    for (uint32_t s = 0; s < cap_of(h, t); s++)
      if (entry_pair(&e[s]) != APPSHOT_PAIR_FREE && (e[s].flags & APPSHOT_F_THREAD) &&
          e[s].owner == sid)
        remove_slot_locked(h, t, s);
  }
  return 1;
}

static int32_t allocate_vid(const struct appshot_header *h,
                            struct appshot_table *t) {
  int64_t span = (int64_t)t->vmax - t->vmin + 1;
  for (int64_t n = 0; n < span; n++) {
    int32_t v = t->vnext;
    t->vnext = (v >= t->vmax) ? t->vmin : v + 1;
    if (probe(h, t, 0, v, NULL) == APPSHOT_PAIR_FREE) return v;
  }
  errno = ENOSPC;
  return -1;
}

int32_t appshot_map_system_locked(struct appshot_header *h,
                                  enum appshot_kind kind, int32_t sid,
                                  uint32_t flags, int32_t owner) {
  struct appshot_table *t = &h->tables[kind];
  uint32_t slot;
  if (slot_of_sid(h, t, sid, &slot)) {
    /* Mapped already: by the object itself (a child that registered before
     * its parent's fork() returned), or by an object that died and whose id
     * the system handed out again; the new one then simply inherits the
     * virtual id, as a reused PID does in the kernel. Only a thread entry
     * found for a process, or the reverse, proves the entry stale. */
    const struct appshot_entry *e = &entries_of(h, t)[slot];
    if (!((e->flags ^ flags) & APPSHOT_F_THREAD)) return pair_vid(entry_pair(e));
    unmap_locked(h, t, sid);
  }
  int32_t vid = allocate_vid(h, t);
  if (vid < 0) return -1;
  if (insert_locked(h, t, vid, sid, flags, owner) != 0) return -1;
  return vid;
}

int appshot_bind_locked(struct appshot_header *h, enum appshot_kind kind,
                        int32_t vid, int32_t sid, uint32_t flags,
                        int32_t owner) {
  struct appshot_table *t = &h->tables[kind];
  if (probe(h, t, 0, vid, NULL) != APPSHOT_PAIR_FREE ||
      probe(h, t, 1, sid, NULL) != APPSHOT_PAIR_FREE) {
    errno = EEXIST;
    return -1;
  }
  return insert_locked(h, t, vid, sid, flags, owner);
}

/* --- Writes (taking the lock) ------------------------------------------- */

int32_t appshot_map_system(struct appshot_header *h, enum appshot_kind kind,
                           int32_t sid, uint32_t flags, int32_t owner) {
  /* Fast path: most callers find the id mapped already. */
  uint32_t slot;
  if (slot_of_sid(h, &h->tables[kind], sid, &slot)) {
    const struct appshot_entry *e = &entries_of(h, &h->tables[kind])[slot];
    uint64_t p = entry_pair(e);
    if (p != APPSHOT_PAIR_FREE && pair_sid(p) == sid &&
        !((LOAD(&e->flags) ^ flags) & APPSHOT_F_THREAD))
      return pair_vid(p);
  }
  struct appshot_held saved;
  if (appshot_lock(h, &saved) != 0) return -1;
  int32_t vid = appshot_map_system_locked(h, kind, sid, flags, owner);
  int err = errno;
  appshot_unlock(h, &saved);
  errno = err;
  return vid;
}

int appshot_bind(struct appshot_header *h, enum appshot_kind kind,
                 int32_t vid, int32_t sid, uint32_t flags, int32_t owner) {
  struct appshot_held saved;
  if (appshot_lock(h, &saved) != 0) return -1;
  int rc = appshot_bind_locked(h, kind, vid, sid, flags, owner);
  int err = errno;
  appshot_unlock(h, &saved);
  errno = err;
  return rc;
}

/* Removes the mapping of `sid`; with `only_vid`, only while `sid` is
 * still mapped to `vid`. 1 if it went. */
static int unmap_sid(struct appshot_header *h, enum appshot_kind kind,
                     int32_t sid, int only_vid, int32_t vid) {
  struct appshot_held saved;
  if (appshot_lock(h, &saved) != 0) return 0;
  struct appshot_table *t = &h->tables[kind];
  uint32_t slot;
  int rc = 0;
  if (!only_vid || (slot_of_sid(h, t, sid, &slot) &&
                    entry_pair(&entries_of(h, t)[slot]) == make_pair(vid, sid)))
    rc = unmap_locked(h, t, sid);
  appshot_unlock(h, &saved);
  return rc;
}

int appshot_unmap_system(struct appshot_header *h, enum appshot_kind kind,
                         int32_t sid) {
  return unmap_sid(h, kind, sid, 0, 0);
}

int appshot_unmap_pair(struct appshot_header *h, enum appshot_kind kind,
                       int32_t vid, int32_t sid) {
  return unmap_sid(h, kind, sid, 1, vid);
}

int appshot_unmap_system_locked(struct appshot_header *h, enum appshot_kind kind,
                                int32_t sid) {
  return unmap_locked(h, &h->tables[kind], sid);
}

/* Test-only pause points, as the preload library's (test_pause in
 * addon/preload/preload.h): a test program that exports appshot_test_pause
 * is called at each; in any other program (and in init and the addon) the
 * weak reference is null and the point costs a not-taken branch. */
extern void appshot_test_pause(const char *where)
    __attribute__((weak, visibility("default")));
static inline void table_test_pause(const char *where) {
  if (__builtin_expect(appshot_test_pause != NULL, 0)) appshot_test_pause(where);
}


/* --- Keys reserved for a create (see appshot_table.h) --------------------- */

int appshot_reserve_key_locked(struct appshot_header *h, enum appshot_kind kind,
                               int32_t vkey, uint32_t *slot) {
  /* No system key yet (IPC_PRIVATE, which is never one): aimed before
   * each attempt. */
  if (store_entry_locked(h, &h->tables[kind], vkey, IPC_PRIVATE,
                         APPSHOT_F_RESERVED, 0, slot) != 0)
    return -1;
  struct appshot_creating *c = &h->creating;
  c->kind = (uint32_t)kind;
  c->slot = *slot;
  c->pid = (int32_t)appshot_raw_syscall(SYS_getpid, 0, 0, 0, 0, 0, 0);
  c->aimed = INT64_MAX; /* nothing aimed at: nothing to adopt */
  return 0;
}

void appshot_aim_reservation_locked(struct appshot_header *h, enum appshot_kind kind,
                                    uint32_t slot, int32_t skey) {
  /* The time first: killed in between, the entry still aims at the key
   * before, with a later time, which adopts less, never more. The euid
   * here, not at the reservation: the lock blocks every signal but the
   * ones glibc keeps for itself, so another thread's setuid() runs in
   * this one mid-create, and the object this attempt makes has the euid
   * of now as its cuid (a change between this and the get is still
   * missed: README, Virtual ids). */
  h->creating.aimed = appshot_ipc_clock();
  h->creating.euid = (uint32_t)appshot_raw_syscall(SYS_geteuid, 0, 0, 0, 0, 0, 0);
  struct appshot_entry *e = &entries_of(h, &h->tables[kind])[slot];
  set_entry_pair(e, make_pair(pair_vid(entry_pair(e)), skey));
}

int appshot_commit_key_locked(struct appshot_header *h, enum appshot_kind kind,
                              uint32_t slot) {
  struct appshot_table *t = &h->tables[kind];
  struct appshot_entry *e = &entries_of(h, t)[slot];
  uint64_t p = entry_pair(e);
  /* Either key bound already: only a file written from outside does that
   * (every bind of a key holds the lock, and none found this one). */
  if (probe(h, t, 0, pair_vid(p), NULL) != APPSHOT_PAIR_FREE ||
      probe(h, t, 1, pair_sid(p), NULL) != APPSHOT_PAIR_FREE) {
    errno = EEXIST;
    return -1;
  }
  /* The flag first, then the indexes: a committer that dies in between
   * leaves a bound entry that the repair indexes. */
  STORE(&e->flags, e->flags & ~APPSHOT_F_RESERVED);
  table_test_pause("keyed-commit-indexing");
  index_slot_locked(h, t, pair_vid(p), pair_sid(p), slot);
  return 0;
}

void appshot_drop_reservation_locked(struct appshot_header *h, enum appshot_kind kind,
                                     uint32_t slot) {
  remove_slot_locked(h, &h->tables[kind], slot);
}

/* The id of the object whose system key is `skey`, of key kind `kind`, or
 * -errno. A get without IPC_CREAT asks for no permission. */
static long raw_id_of_key(enum appshot_kind kind, int32_t skey) {
  switch (kind) {
    case APPSHOT_SEMKEY: return appshot_raw_syscall(SYS_semget, skey, 0, 0, 0, 0, 0);
    case APPSHOT_SHMKEY: return appshot_raw_syscall(SYS_shmget, skey, 0, 0, 0, 0, 0);
    case APPSHOT_MSGKEY: return appshot_raw_syscall(SYS_msgget, skey, 0, 0, 0, 0, 0);
    default: return -EINVAL;
  }
}

static int made_by_creator(const struct appshot_header *h, enum appshot_kind key_kind,
                           uint32_t slot, int32_t skey, int32_t id);

/*
 * A creator holds the lock from its reservation to its commit or drop, so
 * a reservation that a locker finds is a dead creator's: it died inside
 * its create, and the lock word came marked FUTEX_OWNER_DIED. Where it
 * died decides:
 *  - before its object was made (its system key names nothing): the key
 *    was never the application's; the reservation goes;
 *  - after (an object under the reserved system key, which the kernel's
 *    record shows the creator made: made_by_creator): the create did
 *    happen, as far as the kernel knows; the object is adopted, its id
 *    mapped and its key bound, as the creator would have, so that the
 *    application finds it by its key and appshot removes it with the
 *    application. Removing it instead would be the same to the creator,
 *    which never saw the id, but not to a racer of the same key that
 *    waited for the lock and will now find what the creator made.
 *  - an object there that the creator did not make (another's, met as
 *    EEXIST by a creator killed before it aimed at the next key, or made
 *    there between its aim and its get): the application never had it.
 *    The reservation goes and the object stays, as it is, its owner's.
 * Nothing here removes an object: a privileged locker (the engine, init)
 * must never act on a system key written into the file from outside.
 */
static void settle_reservations(struct appshot_header *h) {
  for (int k = APPSHOT_SEMKEY; k <= APPSHOT_MSGKEY; k++) {
    struct appshot_table *t = &h->tables[k];
    struct appshot_entry *e = entries_of(h, t);
    const uint32_t capacity = cap_of(h, t), live = t->live;
    const enum appshot_kind id_kind = (enum appshot_kind)(k - (APPSHOT_SEMKEY - APPSHOT_SEMID));
    /* Up to the last live entry: only the pages entries were written to. */
    for (uint32_t s = 0, seen = 0; s < capacity && seen < live; s++) {
      uint64_t p = entry_pair(&e[s]);
      if (p == APPSHOT_PAIR_FREE) continue;
      seen++;
      if (!(e[s].flags & APPSHOT_F_RESERVED)) continue;
      long id = pair_sid(p) == IPC_PRIVATE ? -ENOENT : raw_id_of_key((enum appshot_kind)k, pair_sid(p));
      if (id >= 0 && id <= INT32_MAX &&
          made_by_creator(h, (enum appshot_kind)k, s, pair_sid(p), (int32_t)id)) {
        /* The id best-effort (a full id table): the bound key finds the
         * object all the same, for the application and for appshot. */
        appshot_map_system_locked(h, id_kind, (int32_t)id, 0, 0);
        if (appshot_commit_key_locked(h, (enum appshot_kind)k, s) == 0) continue;
      }
      remove_slot_locked(h, t, s);
    }
  }
}

/* Whether no process is left in the group `sid` names: kill(-pgid, 0)
 * answers (EPERM: there is one, just not ours to signal). */
static int group_gone(int32_t sid) {
  long r = raw_kill(-(long)sid, 0);
  return !(r == 0 || r == -EPERM);
}

int appshot_forget_process(struct appshot_header *h, int32_t sid) {
  return group_gone(sid) && appshot_unmap_system(h, APPSHOT_PID, sid);
}

int appshot_forget_pair(struct appshot_header *h, int32_t vid, int32_t sid) {
  return group_gone(sid) && appshot_unmap_pair(h, APPSHOT_PID, vid, sid);
}

void appshot_set_flags(struct appshot_header *h, enum appshot_kind kind,
                       int32_t sid, uint32_t flags) {
  struct appshot_held saved;
  if (appshot_lock(h, &saved) != 0) return;
  struct appshot_table *t = &h->tables[kind];
  uint32_t slot;
  if (slot_of_sid(h, t, sid, &slot)) {
    struct appshot_entry *e = &entries_of(h, t)[slot];
    STORE(&e->flags, e->flags | flags);
  }
  appshot_unlock(h, &saved);
}

int32_t appshot_system_key(const struct appshot_header *h, int32_t vkey,
                           uint32_t attempt) {
  uint64_t x = mix64(h->key_salt ^ ((uint64_t)(uint32_t)vkey << 20) ^
                     ((uint64_t)attempt * 0x9e3779b97f4a7c15ull));
  int32_t k = (int32_t)(uint32_t)x;
  /* IPC_PRIVATE (0) means "no key" and -1 is our free marker. */
  if (k == 0 || k == -1) k = 0x41505053; /* unlikely; the caller retries */
  return k;
}

/* --- Privileged readers (see appshot_table.h) --------------------------- */

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* The whole of a small /proc file at `path` into buf (NUL ended, cap
 * bytes with the NUL): its length, or -1. */
static ssize_t read_small(const char *path, char *buf, size_t cap) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  size_t got = 0;
  int failed = 0;
  while (got + 1 < cap) {
    ssize_t n = read(fd, buf + got, cap - 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) failed = 1;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = 0;
  return failed ? -1 : (ssize_t)got;
}

/* `a` + "/" + `b` into out (cap bytes): 0, or -1 if it does not fit. */
static int join_path(char *out, size_t cap, const char *a, const char *b) {
  size_t al = strlen(a), bl = strlen(b);
  if (al + 1 + bl >= cap) return -1;
  memcpy(out, a, al);
  out[al] = '/';
  memcpy(out + al + 1, b, bl + 1);
  return 0;
}

/* `v` in decimal into out (at least 21 bytes), NUL ended. */
static void put_decimal(char *out, uint64_t v) {
  char digits[24];
  int n = 0;
  do digits[n++] = (char)('0' + v % 10);
  while ((v /= 10) && n < (int)sizeof digits);
  while (n) *out++ = digits[--n];
  *out = 0;
}

/* What /proc/PID/stat says of a process (or of a thread, from
 * /proc/PID/task/TID/stat). */
struct proc_stat {
  char state;      /* field 3: 'Z' for a leader that exited */
  pid_t ppid;      /* field 4 */
  long threads;    /* field 20 */
  uint64_t start;  /* field 22: clock ticks since boot */
};

/* The stat file at `path` into *st: 0, or -1 if there is none (a zombie
 * still has one). */
static int proc_stat_at(const char *path, struct proc_stat *st) {
  char buf[1024];
  if (read_small(path, buf, sizeof buf) <= 0) return -1;
  /* comm may hold spaces and parentheses: it ends at the last ')'. */
  char *close_paren = strrchr(buf, ')');
  if (!close_paren || close_paren[1] != ' ' || !close_paren[2]) return -1;
  /* Fields 3 (the state) to 22, each ended by a space. */
  char *p = close_paren + 2;
  uint64_t field[23] = {0};
  st->state = *p;
  for (int i = 3; i <= 22; i++) {
    if (i > 3) {
      uint64_t v = 0;
      for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (uint64_t)(*p - '0');
      field[i] = v;
    }
    while (*p && *p != ' ') p++; /* the state, or a negative field */
    if (*p != ' ') return -1;
    p++;
  }
  st->ppid = (pid_t)field[4];
  st->threads = (long)field[20];
  st->start = field[22];
  return 0;
}

/* From /proc/PID/stat: the parent of `pid` (field 4) into *ppid and its
 * start time (field 22, clock ticks since boot) into *start, either may be
 * NULL. 0, or -1 if there is no such process (a zombie still has both). */
static int proc_stat_of(pid_t pid, pid_t *ppid, uint64_t *start) {
  char path[64];
  struct proc_stat st;
  proc_path(path, pid, "stat");
  if (proc_stat_at(path, &st) != 0) return -1;
  if (ppid) *ppid = st.ppid;
  if (start) *start = st.start;
  return 0;
}

/* The parent of `pid` from /proc/PID/stat, or -1. */
static pid_t parent_of(pid_t pid) {
  pid_t ppid;
  return proc_stat_of(pid, &ppid, NULL) == 0 ? ppid : -1;
}

int appshot_process_id_of(pid_t pid, struct appshot_process_id *id) {
  id->pid = 0;
  id->start = 0;
  if (pid <= 1 || proc_stat_of(pid, NULL, &id->start) != 0) return -1;
  id->pid = pid;
  return 0;
}

/* Whether `pid` is the process `id` names: that PID, and the start time
 * it had then (another process given the PID since started later). A
 * zombie is still the process it was. */
static int is_process(const struct appshot_process_id *id, pid_t pid) {
  uint64_t start;
  return id && id->pid > 1 && id->pid == pid &&
         proc_stat_of(pid, NULL, &start) == 0 && start == id->start;
}

/* The entries of directory `dfd`, one getdents64 buffer at a time (no
 * opendir: no allocation). */
struct dirent_walk {
  int dfd;
  long n, off;
  char buf[4096] __attribute__((aligned(8)));
};

/* The next entry's name (not "." or ".."), or NULL at the end or on an
 * error. */
static const char *next_entry(struct dirent_walk *w) {
  for (;;) {
    if (w->off >= w->n) {
      w->n = syscall(SYS_getdents64, w->dfd, w->buf, sizeof w->buf);
      w->off = 0;
      if (w->n <= 0) return NULL;
    }
    struct {
      uint64_t ino;
      int64_t off;
      unsigned short reclen;
      unsigned char type;
      char name[];
    } *de = (void *)(w->buf + w->off);
    w->off += de->reclen;
    if (de->name[0] != '.') return de->name;
  }
}

/* Where process `pid` (its stat `st`) has its descriptors, environment
 * and mounts seen, into out (cap bytes): /proc/PID, or, once its main
 * thread has exited while others run (a zombie leader, whose fd directory
 * is empty and environ unreadable), /proc/PID/task/TID of a live thread,
 * as the registry looks (procscan.c, review r418 F2). 0, or -1 if it has
 * no live thread. */
static int process_dir(pid_t pid, const struct proc_stat *st, char *out, size_t cap) {
  char dir[64];
  proc_path(dir, pid, "");
  dir[strlen(dir) - 1] = 0; /* no trailing '/' */
  if (strlen(dir) >= cap) return -1;
  memcpy(out, dir, strlen(dir) + 1);
  if (st->state != 'Z' || st->threads <= 1) return 0;
  proc_path(dir, pid, "task");
  struct dirent_walk w;
  w.dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (w.dfd < 0) return -1;
  w.n = w.off = 0;
  int found = -1;
  for (const char *tid; found < 0 && (tid = next_entry(&w));) {
    char task[96], stat[112];
    struct proc_stat ts;
    if (join_path(task, sizeof task, dir, tid) != 0 || join_path(stat, sizeof stat, task, "stat") != 0 ||
        proc_stat_at(stat, &ts) != 0 || ts.state == 'Z' || ts.state == 'X' || strlen(task) >= cap)
      continue;
    memcpy(out, task, strlen(task) + 1);
    found = 0;
  }
  close(w.dfd);
  return found;
}

/* The table file: its device and inode number (statx), and its owner. */
struct table_file {
  uint32_t dev_major, dev_minor;
  uint64_t ino;
  uid_t owner;
  const char *path;
  const char *name; /* its last component, with the '/' before it */
};

/* What fdinfo file `path` says of a descriptor: its flags, mount id and
 * inode (*has_ino: whether it says one, Linux 5.14 on). From the struct
 * file the descriptor is: no file system is asked. The kernel writes
 * these lines first and a driver's own text (show_fdinfo) after them,
 * which may be a user's (a dma-buf's name may hold newlines): the first
 * of each is kept (review r452 F4). 0, or -1 if it cannot be read or
 * lacks flags or a mount id. */
static int fdinfo_of(const char *path, uint64_t *flags, uint64_t *mnt, uint64_t *ino, int *has_ino) {
  char buf[1024];
  if (read_small(path, buf, sizeof buf) <= 0) return -1;
  int have_flags = 0, have_mnt = 0;
  *has_ino = 0;
  for (char *line = buf; line && *line && !(have_flags && have_mnt && *has_ino);
       line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
    uint64_t *into;
    unsigned base = 10; /* flags are written in octal */
    const char *q;
    if (!have_flags && !strncmp(line, "flags:", 6)) {
      into = flags;
      base = 8;
      q = line + 6;
      have_flags = 1;
    } else if (!have_mnt && !strncmp(line, "mnt_id:", 7)) {
      into = mnt;
      q = line + 7;
      have_mnt = 1;
    } else if (!*has_ino && !strncmp(line, "ino:", 4)) {
      into = ino;
      q = line + 4;
      *has_ino = 1;
    } else {
      continue;
    }
    while (*q == ' ' || *q == '\t') q++;
    uint64_t v = 0;
    for (; *q >= '0' && *q < (char)('0' + base); q++) v = v * base + (uint64_t)(*q - '0');
    *into = v;
  }
  return have_flags && have_mnt ? 0 : -1;
}

/* statx of what descriptor `fd` holds, from the inode's cached
 * attributes (AT_STATX_DONT_SYNC): a FUSE or network file system answers
 * from its cache, where a plain fstat may ask its server, and a user's
 * FUSE server could hold root's look for ever. A raw system call: glibc's
 * wrapper may emulate it, and is not listed async-signal-safe. */
static int statx_cached(int fd, struct statx *sx) {
  return (int)syscall(SYS_statx, fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO | STATX_UID,
                      sx);
}

/* The table file held by descriptor `fd` (of path `path`, its
 * registration's) into *t: 0, or -1 if it is no regular file. */
static int table_file_at(int fd, const char *path, struct table_file *t) {
  const char *slash = strrchr(path, '/');
  struct statx sx;
  if (!slash || !slash[1] || strlen(path) >= APPSHOT_PATH_MAX || statx_cached(fd, &sx) != 0 ||
      !S_ISREG(sx.stx_mode))
    return -1;
  t->dev_major = sx.stx_dev_major;
  t->dev_minor = sx.stx_dev_minor;
  t->ino = sx.stx_ino;
  t->owner = sx.stx_uid;
  t->path = path;
  t->name = slash;
  return 0;
}

/* The table file at `path` (the registration's own path, which its
 * registry made: never a path a descriptor's link reads) into *t: 0, or
 * -1 if there is no regular file there. */
static int table_file_of(const char *path, struct table_file *t) {
  int fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -1;
  int r = table_file_at(fd, path, t);
  close(fd);
  return r;
}

static int all_uids_are(const char *dir, uid_t owner);

/* Whether descriptor `name` of the process seen at `dir` (process_dir)
 * is the table file, opened for reading and writing as the preload opens
 * it (preload_fd.c). Read-write, never O_PATH: that takes the file's
 * permission (its owner's, 0600), where an O_PATH descriptor of the same
 * file takes only a search of /dev/shm, anyone's (review r435 N1).
 * The file it is, pinned: /proc/PID/fd/N opened O_PATH (the magic link
 * followed: no lookup, no file system's ->open) holds that file and its
 * mount while we look. Its device and inode (statx, cached) must be the
 * table file's: one file system numbers its inodes once, so this is the
 * file on any mount of it (a process of the application that reopened it
 * by path in a mount namespace of its own), and no file of the same name
 * on a user's own tmpfs (review r418 F1) or a same-named one of its own
 * on a bind of /dev/shm (same device, another inode). Then the process's
 * fdinfo for N gives the flags, and a mount id and inode that must be our
 * pinned descriptor's (our own fdinfo of it): a mount id of a mount we
 * hold cannot have been freed and given again, so that descriptor is, by
 * then, of the very file we examined. An id looked up later (in
 * mountinfo) could have been: a user namespace frees its tmpfs and binds
 * /dev/shm, which takes the same id at once (review r452 F1).
 * A kernel whose fdinfo writes no inode (before 5.14) ties the flags to
 * no file: the descriptor could have been swapped (dup2) between our pin
 * and the fdinfo read, from an O_PATH one of the table file to a
 * read-write one of the user's own on /dev/shm (review r452 F2). There
 * it counts only for a process all of whose uids are the owner's. */
static int is_table_descriptor(const char *dir, const char *name, const struct table_file *t) {
  char path[128];
  char info[96];
  struct statx sx;
  uint64_t flags = 0, mnt = 0, ino = 0, pin_flags = 0, pin_mnt = 0, pin_ino = 0;
  int has_ino, pin_has_ino;
  if (join_path(info, sizeof info, dir, "fd") != 0 || join_path(path, sizeof path, info, name) != 0) return 0;
  int pin = open(path, O_PATH | O_CLOEXEC);
  if (pin < 0) return 0;
  char self[64] = "/proc/self/fdinfo/";
  put_decimal(self + strlen(self), (uint64_t)pin);
  int same = statx_cached(pin, &sx) == 0 && sx.stx_dev_major == t->dev_major && sx.stx_dev_minor == t->dev_minor &&
             sx.stx_ino == t->ino && fdinfo_of(self, &pin_flags, &pin_mnt, &pin_ino, &pin_has_ino) == 0 &&
             join_path(info, sizeof info, dir, "fdinfo") == 0 && join_path(path, sizeof path, info, name) == 0 &&
             fdinfo_of(path, &flags, &mnt, &ino, &has_ino) == 0 && !(flags & O_PATH) &&
             (flags & O_ACCMODE) == O_RDWR && mnt == pin_mnt;
  close(pin); /* the mount id compared while it was held */
  if (!same) return 0;
  if (has_ino && pin_has_ino) return ino == pin_ino;
  return all_uids_are(dir, t->owner);
}

/* Whether the process seen at `dir` holds a descriptor of the table file
 * (is_table_descriptor). Its descriptors walked with getdents (no
 * allocation); each one's link read, and only one that ends in the table
 * file's name looked at further. */
static int holds_tables(const char *dir, const struct table_file *t) {
  char fds[80], link[96], target[APPSHOT_PATH_MAX + 16];
  size_t nl = strlen(t->name);
  if (join_path(fds, sizeof fds, dir, "fd") != 0) return 0;
  struct dirent_walk w;
  w.dfd = open(fds, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (w.dfd < 0) return 0;
  w.n = w.off = 0;
  int found = 0;
  for (const char *name; !found && (name = next_entry(&w));) {
    if (join_path(link, sizeof link, fds, name) != 0) continue;
    ssize_t l = readlink(link, target, sizeof target);
    if (l < (ssize_t)nl || l >= (ssize_t)sizeof target || memcmp(target + l - nl, t->name, nl) != 0) continue;
    found = is_table_descriptor(dir, name, t);
  }
  close(w.dfd);
  return found;
}

/* Whether every uid of the process seen at `dir` (real, effective, saved,
 * file system: /proc/.../status "Uid:") is `owner`. The Name line before
 * it has its newlines escaped: no process writes a "\nUid:" of its own. */
static int all_uids_are(const char *dir, uid_t owner) {
  char path[96], buf[4096];
  if (join_path(path, sizeof path, dir, "status") != 0 || read_small(path, buf, sizeof buf) <= 0) return 0;
  const char *u = strstr(buf, "\nUid:");
  if (!u) return 0;
  u += 5;
  for (int i = 0; i < 4; i++) {
    while (*u == ' ' || *u == '\t') u++;
    if (*u < '0' || *u > '9') return 0;
    uint64_t v = 0;
    for (; *u >= '0' && *u <= '9'; u++) v = v * 10 + (uint64_t)(*u - '0');
    if (v != (uint64_t)owner) return 0;
  }
  return 1;
}

/* Whether the environment of the process seen at `dir` holds exactly
 * APPSHOT_TABLES=<the table file's path>. */
static int environ_names(const char *dir, const struct table_file *t) {
  static const char var[] = "APPSHOT_TABLES=";
  size_t vlen = sizeof var - 1, plen = strlen(t->path);
  char path[96], buf[4096];
  if (join_path(path, sizeof path, dir, "environ") != 0) return 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  size_t pos = 0; /* position in the current entry */
  int match = 1;  /* the current entry so far is a prefix of the wanted one */
  int found = 0;
  ssize_t n;
  while (!found && (n = read(fd, buf, sizeof buf)) > 0)
    for (ssize_t i = 0; i < n; i++) {
      char c = buf[i];
      if (c == 0) {
        if (match && pos == vlen + plen) {
          found = 1;
          break;
        }
        pos = 0;
        match = 1;
        continue;
      }
      if (match) {
        char want = pos < vlen ? var[pos] : pos < vlen + plen ? t->path[pos - vlen] : 0;
        if (c != want) match = 0;
      }
      pos++;
    }
  close(fd);
  return found;
}

/* Whether process `pid` is one of the application's by its table file
 * at `tables_path`: it holds the file (holds_tables: every process of the
 * application does, across exec and changes of user, restored ones
 * included; a process outside it can come by such a descriptor only from
 * one of them), or its environment names the file (`appshot exec` and its
 * children) and every uid it has is the file's owner's. The path is no
 * secret (ls /dev/shm): any user's `env APPSHOT_TABLES=... sleep inf`
 * named it (review r404 F4), and would have been signalled, frozen and
 * dumped into the application's image (and, restored, given a read-write
 * descriptor of its tables), its private SysV segments removed with the
 * application's, and kept an init with no process of its own alive.
 * Looked at through a live thread if its main one has exited, and judged
 * only if its start time is the same after the look: what was read is of
 * one process, not of one that ended and another given its PID. */
static int tables_member(pid_t pid, const char *tables_path, int tables_fd) {
  struct table_file t;
  struct proc_stat before, after;
  char stat[64], dir[96];
  proc_path(stat, pid, "stat");
  if ((tables_fd >= 0 ? table_file_at(tables_fd, tables_path, &t) : table_file_of(tables_path, &t)) != 0 ||
      proc_stat_at(stat, &before) != 0 ||
      process_dir(pid, &before, dir, sizeof dir) != 0)
    return 0;
  int member = holds_tables(dir, &t) || (all_uids_are(dir, t.owner) && environ_names(dir, &t));
  return member && proc_stat_at(stat, &after) == 0 && after.start == before.start;
}

int appshot_pid_belongs(pid_t pid, pid_t init_pid, const char *tables_path) {
  return appshot_pid_belongs_fd(pid, init_pid, tables_path, -1);
}

int appshot_pid_belongs_fd(pid_t pid, pid_t init_pid, const char *tables_path, int tables_fd) {
  if (pid <= 1 || pid == init_pid || pid == getpid()) return 0;
  if (init_pid > 1) {
    /* Up the parent chain: orphans are reparented to init (a subreaper),
     * so every process it started stays below it. */
    pid_t p = pid;
    for (int depth = 0; depth < 4096 && p > 1; depth++) {
      p = parent_of(p);
      if (p == init_pid) return 1;
    }
  }
  return tables_path && *tables_path && tables_member(pid, tables_path, tables_fd);
}

int appshot_signal_member(pid_t pid, int sig, pid_t init_pid,
                          const char *tables_path) {
  return appshot_signal_member_fd(pid, sig, init_pid, tables_path, -1);
}

int appshot_signal_member_fd(pid_t pid, int sig, pid_t init_pid, const char *tables_path, int tables_fd) {
  if (pid <= 1) {
    errno = EPERM;
    return -1;
  }
  /* Opened first: if the process ends and its PID is reused after this,
   * the signal goes to the pidfd's (dead) process, not the new one. */
  int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pfd < 0 && errno != ENOSYS) return -1;
  if (!appshot_pid_belongs_fd(pid, init_pid, tables_path, tables_fd)) {
    if (pfd >= 0) close(pfd);
    errno = EPERM;
    return -1;
  }
  if (pfd < 0) return kill(pid, sig); /* no pidfds: a smaller window */
  int rc = (int)syscall(SYS_pidfd_send_signal, pfd, sig, NULL, 0);
  int e = errno;
  close(pfd);
  errno = e;
  return rc;
}

/* What the kernel records about a SysV object. */
struct ipc_facts {
  int32_t key;
  uint32_t cuid; /* its creator's effective uid */
  time_t ctime;  /* creation, or a later IPC_SET/SETVAL/SETALL: never earlier */
  pid_t cpid;    /* shared memory only: its creator; 0 otherwise */
};

#ifndef SEM_STAT_ANY
#define SEM_STAT_ANY 20
#endif
#ifndef SHM_STAT_ANY
#define SHM_STAT_ANY 15
#endif
#ifndef MSG_STAT_ANY
#define MSG_STAT_ANY 13
#endif

/* IPC_STAT of object `sid` into `ds`, by raw system calls (inside the
 * preload library, semctl() and the rest are its own wrappers, which take
 * virtual ids); without read permission on it, *_STAT_ANY (Linux 4.17),
 * which takes an index, and of an id finds the object at that id's index:
 * what it answers is `sid` only if that object is the one. 0 or -1. */
static int raw_ipc_stat(long nr, long stat_any, int32_t sid, void *ds) {
  long r = nr == SYS_semctl ? appshot_raw_syscall(nr, sid, 0, IPC_STAT, (long)ds, 0, 0)
                            : appshot_raw_syscall(nr, sid, IPC_STAT, (long)ds, 0, 0, 0);
  if (r == 0) return 0;
  r = nr == SYS_semctl ? appshot_raw_syscall(nr, sid, 0, stat_any, (long)ds, 0, 0)
                       : appshot_raw_syscall(nr, sid, stat_any, (long)ds, 0, 0, 0);
  return r == sid ? 0 : -1;
}

static int ipc_facts(enum appshot_kind kind, int32_t sid, struct ipc_facts *f) {
  f->cpid = 0;
  switch (kind) {
    case APPSHOT_SEMID: {
      struct semid_ds ds;
      if (raw_ipc_stat(SYS_semctl, SEM_STAT_ANY, sid, &ds) != 0) return -1;
      f->key = ds.sem_perm.__key;
      f->cuid = ds.sem_perm.cuid;
      f->ctime = ds.sem_ctime;
      return 0;
    }
    case APPSHOT_SHMID: {
      struct shmid_ds ds;
      if (raw_ipc_stat(SYS_shmctl, SHM_STAT_ANY, sid, &ds) != 0) return -1;
      f->key = ds.shm_perm.__key;
      f->cuid = ds.shm_perm.cuid;
      f->ctime = ds.shm_ctime;
      f->cpid = ds.shm_cpid;
      return 0;
    }
    case APPSHOT_MSGID: {
      struct msqid_ds ds;
      if (raw_ipc_stat(SYS_msgctl, MSG_STAT_ANY, sid, &ds) != 0) return -1;
      f->key = ds.msg_perm.__key;
      f->cuid = ds.msg_perm.cuid;
      f->ctime = ds.msg_ctime;
      return 0;
    }
    default: return -1;
  }
}

/* Whether object `id`, found under system key `skey` that the reservation
 * in `slot` of `key_kind` aims at, is the one its dead creator made there
 * (struct appshot_creating): the reservation is the one the witness is
 * about; the object was made by the creator's uid, with a ctime no earlier
 * than the aim; a segment, by the creator's process itself (shm_cpid). A
 * set or a queue records no creating process, and ctime counts seconds
 * (and moves on IPC_SET, SETVAL, SETALL): another process of the
 * creator's uid that made one there in the second of the aim, or changed
 * one there since, is the case taken for the creator's. Unproven (no
 * witness, the object unreadable), an object is not adopted: never one
 * the application did not make. */
static int made_by_creator(const struct appshot_header *h, enum appshot_kind key_kind,
                           uint32_t slot, int32_t skey, int32_t id) {
  const struct appshot_creating *c = &h->creating;
  const enum appshot_kind id_kind = (enum appshot_kind)(key_kind - (APPSHOT_SEMKEY - APPSHOT_SEMID));
  struct ipc_facts f;
  if (c->kind != (uint32_t)key_kind || c->slot != slot) return 0;
  if (ipc_facts(id_kind, id, &f) != 0 || f.key != skey) return 0;
  if ((int64_t)f.ctime < c->aimed || f.cuid != c->euid) return 0;
  return id_kind != APPSHOT_SHMID || f.cpid == c->pid;
}

int64_t appshot_ipc_clock(void) {
  /* The kernel's ipc code stamps ctime with ktime_get_real_seconds(): the
   * seconds of the timekeeper as of its last update, which is what the
   * coarse clock reads. */
  struct timespec now;
  if (clock_gettime(CLOCK_REALTIME_COARSE, &now) != 0) return (int64_t)time(NULL);
  return (int64_t)now.tv_sec;
}

static int32_t salted_key(uint64_t salt, int32_t vkey, uint32_t attempt) {
  struct appshot_header h;
  h.key_salt = salt;
  return appshot_system_key(&h, vkey, attempt);
}

/* The virtual key an entry of the key table maps system key `skey` (the
 * key of object `id`) to, bound or reserved (APPSHOT_F_RESERVED: its
 * create in progress, aimed at `skey`): 1 if there is one. Found in the
 * entry array, the truth, not through the index (appshot_s2v), which can
 * lack a bound entry: a writer killed inside its change (between a
 * commit's clearing of the flag and its indexing, say) leaves the repair
 * to the next locker, and after the application's end there may be none.
 * A reservation is in no index at all: the object of a creator killed
 * inside its create, which no locker has settled yet, is the
 * application's too, but only if the creator made it (made_by_creator,
 * the test a settling locker adopts it by): another's object that the
 * creator met there as EEXIST, or that was made there after its aim, is
 * left alone whether a locker settles first or the application is
 * removed first. */
static int vkey_of_entry(const struct appshot_header *h, enum appshot_kind key_kind,
                         int32_t skey, int32_t id, int32_t *vkey) {
  const uint32_t capacity = appshot_capacity(key_kind);
  struct appshot_scan sc;
  appshot_scan_begin(h, key_kind, &sc);
  for (uint32_t s = 0; s < capacity && !appshot_scan_over(h, key_kind, &sc); s++) {
    int32_t v, sid;
    uint32_t flags;
    if (!appshot_entry_at(h, key_kind, s, &v, &sid, &flags, NULL)) continue;
    appshot_scan_found(&sc);
    if (sid == skey && skey != IPC_PRIVATE &&
        (!(flags & APPSHOT_F_RESERVED) || made_by_creator(h, key_kind, s, skey, id))) {
      *vkey = v;
      return 1;
    }
  }
  return 0;
}

/*
 * The rule for removing a SysV object named in the tables:
 *  - it exists and the kernel says it was created (or last set) no earlier
 *    than the tables were: an object that existed before the application
 *    is never its own;
 *  - a keyed object: its key is one of the application's system keys, a
 *    key an entry of its key table maps a virtual key to, bound (indexed
 *    or not: a writer killed before indexing it) or reserved (a creator
 *    killed inside its create, which made this object: made_by_creator),
 *    AND that the application's salt derives from that virtual key
 *    (appshot_system_key, attempts 0..63): the kind of key no one outside
 *    the application uses;
 *  - a private (IPC_PRIVATE) shared memory segment whose creator still
 *    lives: the creator is a process of the application, or the parent of
 *    its init (the restore driver, which recreates segments before init
 *    starts), or the process that started init (`starter`, init's own
 *    question: NULL otherwise). The last is the driver too, still, once
 *    it has died and init has been reparented: a driver killed (kill -9)
 *    before its commit is a zombie until its parent reaps it, "alive" to
 *    kill(), while init removes the abandoned restore's objects and then
 *    its tables, which nobody could retry from. Known by its PID and
 *    start time, not the PID alone: a process given that PID since is
 *    another. It accepts no segment the parent rule did not while the
 *    driver lived: a dead one makes none.
 * Sets and queues record no creating process: a private one is the
 * application's by its ctime alone, whoever made it, alive or not.
 * What remains possible is named in the README (Privileges).
 */
static int ipc_owned(const struct appshot_header *h, enum appshot_kind kind,
                     int32_t sid, uint64_t salt, int64_t created,
                     pid_t init_pid, const char *tables_path,
                     const struct appshot_process_id *starter) {
  if (kind != APPSHOT_SEMID && kind != APPSHOT_SHMID && kind != APPSHOT_MSGID)
    return 0;
  if (sid < 0) return 0;
  struct ipc_facts f;
  if (ipc_facts(kind, sid, &f) != 0) return 0;
  if ((int64_t)f.ctime < created) return 0;
  if (f.key != IPC_PRIVATE) {
    enum appshot_kind key_kind = (enum appshot_kind)(kind + (APPSHOT_SEMKEY - APPSHOT_SEMID));
    int32_t vkey;
    if (!h || !(appshot_s2v(h, key_kind, f.key, &vkey) || vkey_of_entry(h, key_kind, f.key, sid, &vkey)))
      return 0;
    for (uint32_t attempt = 0; attempt < 64; attempt++)
      if (salted_key(salt, vkey, attempt) == f.key) return 1;
    return 0;
  }
  if (kind == APPSHOT_SHMID && f.cpid > 0 &&
      (kill(f.cpid, 0) == 0 || errno == EPERM) /* alive */ &&
      !appshot_pid_belongs(f.cpid, init_pid, tables_path) &&
      !(init_pid > 1 && parent_of(init_pid) == f.cpid) &&
      !is_process(starter, f.cpid))
    return 0;
  return 1;
}

int appshot_ipc_owned(const struct appshot_header *h, enum appshot_kind kind,
                      int32_t sid, uint64_t salt, int64_t created,
                      pid_t init_pid, const char *tables_path) {
  return ipc_owned(h, kind, sid, salt, created, init_pid, tables_path, NULL);
}

/* The id of the object whose key is `skey` (kind APPSHOT_SEMKEY, _SHMKEY or
 * _MSGKEY), or -1: a get without IPC_CREAT, which asks for no permission,
 * so it finds another user's object as well. Raw system calls: never a
 * preload library's translation. */
static int32_t ipc_id_of_key(enum appshot_kind key_kind, int32_t skey) {
  if (skey == IPC_PRIVATE) return -1;
  long id;
  switch (key_kind) {
    case APPSHOT_SEMKEY: id = syscall(SYS_semget, (long)skey, 0L, 0L); break;
    case APPSHOT_SHMKEY: id = syscall(SYS_shmget, (long)skey, 0L, 0L); break;
    case APPSHOT_MSGKEY: id = syscall(SYS_msgget, (long)skey, 0L); break;
    default: return -1;
  }
  return id < 0 || id > INT32_MAX ? -1 : (int32_t)id;
}

int appshot_ipc_remove_owned(const struct appshot_header *h,
                             enum appshot_kind kind, int32_t sid,
                             uint64_t salt, int64_t created, pid_t init_pid,
                             const char *tables_path) {
  return appshot_ipc_remove_owned_started(h, kind, sid, salt, created, init_pid,
                                          tables_path, NULL);
}

int appshot_ipc_remove_owned_started(const struct appshot_header *h,
                                     enum appshot_kind kind, int32_t sid,
                                     uint64_t salt, int64_t created,
                                     pid_t init_pid, const char *tables_path,
                                     const struct appshot_process_id *starter) {
  /* A key of the key tables: the object made under it, if one was, whether
   * or not its id made it into the id tables (see the header). */
  if (kind == APPSHOT_SEMKEY || kind == APPSHOT_SHMKEY || kind == APPSHOT_MSGKEY) {
    sid = ipc_id_of_key(kind, sid);
    if (sid < 0) return 0;
    kind = (enum appshot_kind)(kind - (APPSHOT_SEMKEY - APPSHOT_SEMID));
  }
  if (!ipc_owned(h, kind, sid, salt, created, init_pid, tables_path, starter))
    return 0;
  int rc = -1;
  switch (kind) {
    case APPSHOT_SEMID: rc = semctl(sid, 0, IPC_RMID); break;
    case APPSHOT_SHMID: rc = shmctl(sid, IPC_RMID, NULL); break;
    case APPSHOT_MSGID: rc = msgctl(sid, IPC_RMID, NULL); break;
    default: break;
  }
  return rc == 0;
}

/* --- Socket notes --------------------------------------------------------- */

/* The key of a reuseport group in the lost filter: apart from inode
 * numbers, which sockfs keeps below 2^32. */
static uint64_t group_key(uint16_t port, uint8_t type) {
  return (1ull << 63) | ((uint64_t)type << 16) | port;
}

/* Two bit positions of `key` (splitmix64's finaliser: every key bit moves
 * both). */
static void lost_bits(uint64_t key, uint32_t bit[2]) {
  uint64_t z = key + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  bit[0] = (uint32_t)(z % APPSHOT_LOST_SEEN_BITS);
  bit[1] = (uint32_t)((z >> 32) % APPSHOT_LOST_SEEN_BITS);
}

static void lost_mark(struct appshot_socket_notes *n, uint64_t key) {
  uint32_t bit[2];
  lost_bits(key, bit);
  for (int i = 0; i < 2; i++)
    __atomic_fetch_or(&n->lost_seen[bit[i] / 64], 1ull << (bit[i] % 64),
                      __ATOMIC_RELAXED);
}

int appshot_lost_maybe(const uint8_t *lost_seen, uint64_t ino, uint16_t port,
                       uint8_t type) {
  uint32_t bit[2];
  lost_bits(ino ? ino : group_key(port, type), bit);
  /* Bit b of word w is bit b % 8 of byte w * 8 + b / 8: bit i of the
   * whole is bit i % 8 of byte i / 8. */
  for (int i = 0; i < 2; i++)
    if (!(lost_seen[bit[i] / 8] & (1u << (bit[i] % 8)))) return 0;
  return 1;
}

void appshot_lost_copy(const struct appshot_header *h, uint8_t *out) {
  for (int i = 0; i < APPSHOT_LOST_SEEN_BITS / 64; i++) {
    uint64_t w = __atomic_load_n(&h->sockets.lost_seen[i], __ATOMIC_RELAXED);
    for (int j = 0; j < 8; j++) out[i * 8 + j] = (uint8_t)(w >> (8 * j));
  }
}

void appshot_forget_lost(struct appshot_header *h) {
  for (int i = 0; i < APPSHOT_LOST_SEEN_BITS / 64; i++)
    __atomic_store_n(&h->sockets.lost_seen[i], 0, __ATOMIC_RELAXED);
  __atomic_store_n(&h->sockets.lost, 0, __ATOMIC_RELEASE);
}

static void note(struct appshot_header *h, uint64_t ino, int32_t level,
                 int32_t name, int32_t value, uint16_t port, uint8_t type,
                 int32_t maker) {
  struct appshot_socket_notes *n = &h->sockets;
  struct appshot_socket_note *slot = NULL;
  for (int i = 0; i < APPSHOT_SOCKET_NOTES && !slot; i++) {
    struct appshot_socket_note *e = &n->note[i];
    if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) == ino &&
        __atomic_load_n(&e->level, __ATOMIC_RELAXED) == level &&
        __atomic_load_n(&e->name, __ATOMIC_RELAXED) == name)
      slot = e;
  }
  for (int i = 0; i < APPSHOT_SOCKET_NOTES && !slot; i++) {
    uint64_t free_ino = 0;
    struct appshot_socket_note *e = &n->note[i];
    if (__atomic_compare_exchange_n(&e->ino, &free_ino, ino, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
      __atomic_store_n(&e->ready, 0, __ATOMIC_RELAXED);
      slot = e;
    }
  }
  if (!slot) {
    /* Marked before counted: a snapshot that sees the count sees the
     * marks. */
    lost_mark(n, ino);
    if (level == SOL_SOCKET &&
        (name == SO_ATTACH_REUSEPORT_CBPF || name == SO_ATTACH_REUSEPORT_EBPF) &&
        port)
      lost_mark(n, group_key(port, type));
    __atomic_add_fetch(&n->lost, 1, __ATOMIC_RELEASE);
    return;
  }
  __atomic_store_n(&slot->level, level, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->name, name, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->value, value, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->maker, maker, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->port, port, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->type, type, __ATOMIC_RELAXED);
  __atomic_store_n(&slot->ready, 1, __ATOMIC_RELEASE);
}

void appshot_note_socket(struct appshot_header *h, uint64_t ino, int32_t level,
                         int32_t name, int32_t value, uint16_t port,
                         uint8_t type) {
  note(h, ino, level, name, value, port, type, 0);
}

void appshot_note_dnotify(struct appshot_header *h, uint64_t ino, int32_t mask,
                          int32_t maker) {
  note(h, ino, APPSHOT_NOTE_DNOTIFY, F_NOTIFY, mask, 0, 0, maker);
}

void appshot_unnote_mq_notify(struct appshot_header *h, uint64_t ino, int32_t owner) {
  for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
    struct appshot_socket_note *e = &h->sockets.note[i];
    if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) != ino ||
        __atomic_load_n(&e->level, __ATOMIC_RELAXED) != APPSHOT_NOTE_MQ_NOTIFY ||
        (owner && __atomic_load_n(&e->maker, __ATOMIC_RELAXED) != owner))
      continue;
    __atomic_store_n(&e->ready, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&e->ino, 0, __ATOMIC_RELEASE);
  }
}

void appshot_note_mq_notify(struct appshot_header *h, uint64_t ino,
                            int32_t signo, uint64_t value, int32_t owner) {
  /* The value's low half is the note's name, which note() matches on: a
   * note of another value (or owner) would stay beside this one. */
  appshot_unnote_mq_notify(h, ino, 0);
  note(h, ino, APPSHOT_NOTE_MQ_NOTIFY, (int32_t)(uint32_t)value,
       (int32_t)(uint32_t)(value >> 32), (uint16_t)signo, 0, owner);
}

int appshot_mq_notify_noted(const struct appshot_header *h, uint64_t ino,
                            int32_t *signo, uint64_t *value, int32_t *owner) {
  for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
    const struct appshot_socket_note *e = &h->sockets.note[i];
    if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) != ino ||
        !__atomic_load_n(&e->ready, __ATOMIC_ACQUIRE) ||
        e->level != APPSHOT_NOTE_MQ_NOTIFY)
      continue;
    *signo = e->port;
    *value = (uint64_t)(uint32_t)e->name | (uint64_t)(uint32_t)e->value << 32;
    if (owner) *owner = e->maker;
    return 1;
  }
  return 0;
}

void appshot_unnote_socket(struct appshot_header *h, uint64_t ino,
                           int32_t level, int32_t name, uint16_t port,
                           uint8_t type) {
  for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
    struct appshot_socket_note *e = &h->sockets.note[i];
    uint64_t at = __atomic_load_n(&e->ino, __ATOMIC_ACQUIRE);
    if (!at || !__atomic_load_n(&e->ready, __ATOMIC_ACQUIRE) ||
        e->level != level || e->name != name)
      continue;
    if (at == ino || (port && e->port == port && e->type == type)) {
      __atomic_store_n(&e->ready, 0, __ATOMIC_RELAXED);
      __atomic_store_n(&e->ino, 0, __ATOMIC_RELEASE);
    }
  }
}

void appshot_forget_socket(struct appshot_header *h, uint64_t ino) {
  for (int i = 0; i < APPSHOT_SOCKET_NOTES; i++) {
    struct appshot_socket_note *e = &h->sockets.note[i];
    if (__atomic_load_n(&e->ino, __ATOMIC_ACQUIRE) != ino) continue;
    __atomic_store_n(&e->ready, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&e->ino, 0, __ATOMIC_RELEASE);
  }
}

/* --- Wait calls across a restore (see appshot_table.h) -------------------- */

_Static_assert(sizeof(struct rusage) <= APPSHOT_WAIT_OUT, "rusage fits a wait slot");
_Static_assert(sizeof(siginfo_t) <= APPSHOT_WAIT_OUT, "siginfo fits a wait slot");

/* The mark: no rusage (ru_utime.tv_sec) and no siginfo (si_signo, si_errno)
 * the kernel writes starts with 8 bytes of ones. Relaxed is enough: the
 * kernel writes `out` inside the holder's own call (program order), and a
 * restore writes the slot while the holder is stopped by ptrace, whose stop
 * and resume order everything on either side. */
#define WAIT_MARK UINT64_MAX

static inline uint64_t *mark_of(uint8_t *area) { return (uint64_t *)(void *)area; }
static inline int marked(const uint8_t *area) {
  return __atomic_load_n((const uint64_t *)(const void *)area, __ATOMIC_RELAXED) == WAIT_MARK;
}

int appshot_wait_begin(struct appshot_header *h, int32_t holder, int reclaim) {
  if (holder <= 0) return -1;
  struct appshot_waits *w = appshot_waits_of(h);
  uint32_t start = mix32((uint32_t)holder) % APPSHOT_WAIT_SLOTS;
  /* First a free slot; then one whose holder is gone from the PID table (a
   * thread killed in its call never gave its slot back). */
  for (uint32_t n = 0; n < 2 * APPSHOT_WAIT_SLOTS; n++) {
    struct appshot_wait_slot *s = &w->slot[(start + n) % APPSHOT_WAIT_SLOTS];
    int32_t seen = __atomic_load_n(&s->holder, __ATOMIC_RELAXED), sid;
    if (seen != 0 && !(reclaim && seen == holder) &&
        (n < APPSHOT_WAIT_SLOTS || appshot_v2s(h, APPSHOT_PID, seen, &sid)))
      continue;
    if (!__atomic_compare_exchange_n(&s->holder, &seen, holder, 0,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
      continue;
    /* Only this thread writes the slot from here on, and a restore, which
     * stops it first (a ptrace stop orders everything before it). */
    __atomic_store_n(&s->moved, 0, __ATOMIC_RELAXED);
    /* Zeroed: the kernel writes only some fields of a waitid siginfo, and
     * what the last holder's call left in the rest must not reach this
     * caller (nor an image). */
    memset(s->out, 0, sizeof s->out);
    memset(s->carried, 0, sizeof s->carried);
    __atomic_store_n(mark_of(s->out), WAIT_MARK, __ATOMIC_RELAXED);
    __atomic_store_n(mark_of(s->carried), WAIT_MARK, __ATOMIC_RELAXED);
    return (int)((start + n) % APPSHOT_WAIT_SLOTS);
  }
  return -1;
}

void *appshot_wait_out(struct appshot_header *h, int slot) {
  return appshot_waits_of(h)->slot[slot].out;
}

enum appshot_wait_origin appshot_wait_origin(struct appshot_header *h,
                                             int slot, const void **answer) {
  struct appshot_wait_slot *s = &appshot_waits_of(h)->slot[slot];
  *answer = s->out;
  /* Written here by the kernel, or written nowhere yet (no child). */
  if (!marked(s->out) || marked(s->carried)) return APPSHOT_WAIT_HERE;
  *answer = s->carried;
  return __atomic_load_n(&s->moved, __ATOMIC_RELAXED) == 1 ? APPSHOT_WAIT_BEFORE
                                                           : APPSHOT_WAIT_LOST;
}

int appshot_wait_end(struct appshot_header *h, int slot, int32_t holder) {
  /* Only by its holder: a process forked in a signal handler that ran
   * during the call returns into the same call with the same slot number,
   * and must not free its parent's slot from under it. */
  int32_t expected = holder;
  return __atomic_compare_exchange_n(&appshot_waits_of(h)->slot[slot].holder,
                                     &expected, 0, 0, __ATOMIC_RELEASE,
                                     __ATOMIC_RELAXED);
}

int appshot_wait_held(const struct appshot_header *h, int slot,
                      int32_t holder) {
  return __atomic_load_n(&appshot_waits_of(h)->slot[slot].holder,
                         __ATOMIC_ACQUIRE) == holder;
}

int appshot_wait_answered(const struct appshot_header *h, uint32_t slot,
                          int32_t *holder) {
  const struct appshot_wait_slot *s = &appshot_waits_of(h)->slot[slot];
  *holder = __atomic_load_n(&s->holder, __ATOMIC_ACQUIRE);
  return *holder != 0 && !marked(s->out);
}

int appshot_prior_s2v(const struct appshot_header *h, int32_t sid,
                      int32_t *vid) {
  const struct appshot_waits *w = appshot_waits_of(h);
  uint32_t n = __atomic_load_n(&w->prior_count, __ATOMIC_RELAXED);
  if (n > APPSHOT_PID_CAPACITY) n = APPSHOT_PID_CAPACITY;
  /* Only after a restore that froze a wait call: rare enough to scan. */
  for (uint32_t i = 0; i < n; i++) {
    uint64_t p = __atomic_load_n(&w->prior[i], __ATOMIC_RELAXED);
    if (p != APPSHOT_PAIR_FREE && pair_sid(p) == sid) {
      *vid = pair_vid(p);
      return 1;
    }
  }
  return 0;
}

void appshot_prior_forget(struct appshot_header *h, int32_t vid, int32_t sid) {
  struct appshot_waits *w = appshot_waits_of(h);
  uint32_t n = __atomic_load_n(&w->prior_count, __ATOMIC_RELAXED);
  if (n > APPSHOT_PID_CAPACITY) n = APPSHOT_PID_CAPACITY;
  uint64_t pair = make_pair(vid, sid);
  for (uint32_t i = 0; i < n; i++) {
    uint64_t p = __atomic_load_n(&w->prior[i], __ATOMIC_RELAXED);
    if (p == pair)
      __atomic_compare_exchange_n(&w->prior[i], &p, APPSHOT_PAIR_FREE, 0,
                                  __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  }
}

/* The same for bytes from anywhere (an image's, not 8-aligned). */
static int marked_bytes(const void *area) {
  uint64_t first;
  memcpy(&first, area, sizeof first);
  return first == WAIT_MARK;
}

int appshot_wait_carry(struct appshot_header *h, uint32_t slot,
                       int32_t holder, uint32_t moved, const void *out,
                       const void *carried) {
  if (slot >= APPSHOT_WAIT_SLOTS || holder <= 0) {
    errno = EINVAL;
    return -1;
  }
  struct appshot_wait_slot *s = &appshot_waits_of(h)->slot[slot];
  s->holder = holder;
  if (!marked_bytes(out)) {
    /* The call ran on the image's node: its answer is one node back. */
    memcpy(s->carried, out, APPSHOT_WAIT_OUT);
    s->moved = 1;
  } else {
    /* Not run yet (it will run here), or run on an earlier node still. */
    memcpy(s->carried, carried, APPSHOT_WAIT_OUT);
    s->moved = marked_bytes(carried) ? 0 : (moved < UINT32_MAX ? moved + 1 : moved);
  }
  *mark_of(s->out) = WAIT_MARK;
  return 0;
}

int appshot_prior_add(struct appshot_header *h, int32_t vid, int32_t sid) {
  struct appshot_waits *w = appshot_waits_of(h);
  if (w->prior_count >= APPSHOT_PID_CAPACITY) {
    errno = ENOSPC;
    return -1;
  }
  w->prior[w->prior_count] = make_pair(vid, sid);
  __atomic_store_n(&w->prior_count, w->prior_count + 1, __ATOMIC_RELEASE);
  return 0;
}
