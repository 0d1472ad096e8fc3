/*
 * SysV semaphores, shared memory and message queues: ids and keys.
 *
 * Ids: the kernel's ids are mapped to virtual ones when a get returns them;
 * a call naming an id the table does not know fails with EINVAL, as the
 * kernel answers for an id that does not exist. That also keeps the
 * application away from other applications' objects and the system's.
 *
 * Keys: a virtual key k is bound to a system key of this application (a
 * salted hash of k, see appshot_system_key) the first time k is created, so
 * two applications using the same key do not meet. IPC_PRIVATE is never
 * translated.
 */
#include <cpuid.h>

#include "preload.h"

#include <ucontext.h>

struct ipc_kind {
  long get_nr;           /* SYS_semget... */
  enum appshot_kind id;  /* APPSHOT_SEMID... */
  enum appshot_kind key; /* APPSHOT_SEMKEY... */
};

static const struct ipc_kind SEM = {SYS_semget, APPSHOT_SEMID, APPSHOT_SEMKEY};
static const struct ipc_kind SHM = {SYS_shmget, APPSHOT_SHMID, APPSHOT_SHMKEY};
static const struct ipc_kind MSG = {SYS_msgget, APPSHOT_MSGID, APPSHOT_MSGKEY};

/* Raw get: semget(key, nsems, flags), shmget(key, size, flags),
 * msgget(key, flags). */
static long raw_get(const struct ipc_kind *k, key_t key, long size, int flags) {
  return k->get_nr == SYS_msgget ? SYS2(msgget, key, flags)
                                 : appshot_raw_syscall(k->get_nr, key, size, flags, 0, 0, 0);
}

static void raw_rmid(const struct ipc_kind *k, int sid) {
  if (k->get_nr == SYS_semget) SYS3(semctl, sid, 0, IPC_RMID);
  else if (k->get_nr == SYS_shmget) SYS3(shmctl, sid, IPC_RMID, 0);
  else SYS3(msgctl, sid, IPC_RMID, 0);
}

/* The object under a bound system key: the kernel's answer to the get of
 * an existing key (EEXIST for IPC_CREAT | IPC_EXCL, before any check of
 * permissions or size, as the kernel answers), or -ENOENT if there is
 * none. Never makes one: only a reserved key's create does, under the
 * lock (create_keyed). */
static long get_bound(const struct ipc_kind *k, int32_t skey, long size, int flags) {
  if ((flags & (IPC_CREAT | IPC_EXCL)) == (IPC_CREAT | IPC_EXCL)) {
    long r = raw_get(k, skey, 0, 0); /* asks for no permission */
    return r >= 0 ? -EEXIST : r;
  }
  return raw_get(k, skey, size, flags & ~IPC_CREAT);
}

/* A get with IPC_CREAT of a virtual key that names no object (its first
 * use, or its object gone), under the lock: finds a system key of ours
 * that no one outside uses and binds it. The key is reserved in the
 * tables before the object is made and bound once it exists
 * (appshot_reserve_key_locked, appshot_table.h): a process killed at any
 * instant in here leaves either nothing, a reservation the next locker
 * settles (adopting the object if its creator made it), or the key bound.
 * Made first and recorded after, a kill in between left an object that
 * no table named and that nothing would ever remove. */
static long create_reserved(const struct ipc_kind *k, key_t key, long size,
                            int flags, int32_t *vid) {
  uint32_t reserved;
  if (appshot_reserve_key_locked(g_h, k->key, key, &reserved) != 0) return -errno;
  long r = -ENOSPC; /* 64 taken keys in a row: the key space is crowded */
  for (uint32_t attempt = 0; attempt < 64; attempt++) {
    int32_t skey = appshot_system_key(g_h, key, attempt);
    appshot_aim_reservation_locked(g_h, k->key, reserved, skey);
    test_pause("keyed-key-reserved");
    r = raw_get(k, skey, size, flags | IPC_CREAT | IPC_EXCL);
    if (r != -EEXIST) break; /* EEXIST: someone outside the application's */
    test_pause("keyed-key-taken");
  }
  if (r >= 0) {
    appshot_ipc_pids_forget(g_h, k->id, (int32_t)r); /* a new object */
    test_pause("keyed-object-made");
    /* The id, then the key, as a settling locker adopts them. */
    *vid = appshot_map_system_locked(g_h, k->id, (int32_t)r, 0, 0);
    if (*vid < 0 || appshot_commit_key_locked(g_h, k->key, reserved) != 0) {
      long err = -errno;
      if (*vid >= 0) appshot_unmap_system_locked(g_h, k->id, (int32_t)r);
      raw_rmid(k, (int)r); /* nobody could name it */
      *vid = -1;
      r = err;
    }
  }
  if (r < 0) appshot_drop_reservation_locked(g_h, k->key, reserved);
  return r;
}

/* A get with IPC_CREAT of a virtual key that named no object, atomic with
 * respect to the application's other processes: they may race for the
 * same key, and the lock makes them wait; the loser finds the key bound
 * and its object there.
 *
 * A key still bound to a system key that names nothing (a process killed
 * in IPC_RMID after the kernel removed the object and before it unbound
 * the key) is unbound and created afresh as a new one is. Made through
 * the binding instead, without the lock, an object whose maker was killed
 * before it mapped the id had a key but no id entry, and no repair gave
 * it one (the maker held no lock to die with): a snapshot, which dumps
 * the objects the id tables name, missed it. */
static long create_keyed(const struct ipc_kind *k, key_t key, long size,
                         int flags, int32_t *vid) {
  struct appshot_held saved;
  *vid = -1;
  if (appshot_lock(g_h, &saved) != 0) return -errno;
  test_pause("table-locked");
  int32_t skey;
  long r = -ENOENT;
  if (appshot_v2s(g_h, k->key, key, &skey)) {
    r = get_bound(k, skey, size, flags); /* another process won the race */
    if (r == -ENOENT)
      appshot_unmap_system_locked(g_h, k->key, skey); /* its object gone */
    else if (r >= 0 && (*vid = appshot_map_system_locked(g_h, k->id, (int32_t)r, 0, 0)) < 0)
      r = -errno;
  }
  if (r == -ENOENT) r = create_reserved(k, key, size, flags, vid);
  appshot_unlock(g_h, &saved);
  return r;
}

/* A translation window (preload.h): the system id the kernel returns is on
 * its way into the tables, and a keyed creation holds the table lock. A
 * bound key's object is found without the lock, never made there: a get
 * that would make one takes the lock (create_keyed). */
static long do_get(const struct ipc_kind *k, key_t key, long size, int flags) {
  ID_WINDOW();
  int32_t skey, vid;
  long r;
  if (key == IPC_PRIVATE) {
    r = raw_get(k, IPC_PRIVATE, size, flags);
    /* Always a new object: no record of an old one under its id applies. */
    if (r >= 0) appshot_ipc_pids_forget(g_h, k->id, (int32_t)r);
  } else
    r = appshot_v2s(g_h, k->key, key, &skey) ? get_bound(k, skey, size, flags) : -ENOENT;
  if (r == -ENOENT && key != IPC_PRIVATE && (flags & IPC_CREAT)) {
    r = create_keyed(k, key, size, flags, &vid);
    return r < 0 ? libc_ret(r) : vid;
  }
  if (r < 0) return libc_ret(r);
  test_pause("ipc-get-answered");
  vid = appshot_map_system(g_h, k->id, (int32_t)r, 0, 0);
  if (vid < 0) {
    /* A private object nobody could name would only leak. */
    if (key == IPC_PRIVATE) raw_rmid(k, (int)r);
    return fail(ENOSPC);
  }
  return vid;
}

long do_ipc_get(enum appshot_kind kind, key_t key, long a, long b) {
  switch (kind) {
    case APPSHOT_SEMID: return do_get(&SEM, key, a, (int)b);
    case APPSHOT_SHMID: return do_get(&SHM, key, a, (int)b);
    default: return do_get(&MSG, key, 0, (int)a);
  }
}

API int semget(key_t key, int nsems, int flags) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS3(semget, key, nsems, flags));
  return (int)do_get(&SEM, key, nsems, flags);
}

API int shmget(key_t key, size_t size, int flags) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS3(shmget, key, size, flags));
  return (int)do_get(&SHM, key, (long)size, flags);
}

API int msgget(key_t key, int flags) {
  ensure_init();
  if (!g_h) return (int)libc_ret(SYS2(msgget, key, flags));
  return (int)do_get(&MSG, key, 0, flags);
}

/* --- Ids --------------------------------------------------------------- */

/* The system id for a virtual one; pass-through leaves it alone. */
static int id_arg(enum appshot_kind kind, int vid, int *sid) {
  ensure_init();
  *sid = vid;
  if (!g_h) return 1;
  int32_t s;
  if (vid < 0 || !appshot_v2s(g_h, kind, vid, &s)) {
    errno = EINVAL;
    return 0;
  }
  *sid = s;
  return 1;
}

/* A system key back to the virtual key the application used. Keys not in
 * the table (IPC_PRIVATE, objects made outside) stay as they are. */
static key_t vkey(enum appshot_kind kind, key_t skey) {
  int32_t v;
  return skey != IPC_PRIVATE && appshot_s2v(g_h, kind, skey, &v) ? v : skey;
}

/* A PID an IPC_STAT, *_STAT or GETPID of object `sid` shows in `field`
 * (APPSHOT_IPC_*, a semaphore's number), `shown` the kernel's. While the
 * kernel shows exactly what a restore left there (its restorer, or
 * nobody), the process the image recorded (appshot_ipc_pids), if it is
 * still the application's: the kernel's value names the object's creator
 * or last user for as long as nobody uses it again, and so does this.
 * Else a process of the application by its virtual PID; else 0, as a PID
 * namespace shows a process outside it.
 *
 * The record first: the restorer's PID, once it has exited, may be handed
 * to a process of the application. Translated first, that process would
 * be named as the creator (shm_cpid, which the kernel never changes: for
 * good) or last user of an object it never touched. The record first
 * misnames only where that process really is the object's last user
 * (until the next use by another): it needs the same reuse of the PID and
 * a use of this object by that one process besides, the rarer case; for
 * shm_cpid it cannot happen (an entry is forgotten when its object goes
 * or a new object gets its id, appshot_ipc_pids_forget). A recorded
 * process that is gone is 0, unless the kernel's value names a process
 * of the application: then that one, which may be the reuser's real use. */
static pid_t ipc_pid_out(enum appshot_kind kind, int32_t sid, uint32_t field, int32_t shown) {
  int32_t v, s;
  if (appshot_ipc_pid_recorded(g_h, kind, sid, field, shown, &v) && v > 0 &&
      appshot_v2s(g_h, APPSHOT_PID, v, &s))
    return v;
  if (shown > 0 && appshot_s2v(g_h, APPSHOT_PID, shown, &v)) return v;
  return 0;
}

/* The *_STAT commands that take an index and return a system id: an
 * object that is not the application's does not exist for it. */
static long stat_index_result(enum appshot_kind kind, long sid) {
  int32_t v;
  if (sid < 0) return sid;
  return appshot_s2v(g_h, kind, (int32_t)sid, &v) ? v : fail(EINVAL);
}

/* After IPC_RMID of the object under system key `skey`: the key names
 * nothing any more, unless another process has made its object again in
 * between (the kernel removed ours; the other's create_keyed found the
 * binding empty and made a new object at the same system key, the key's
 * first free one, as ours was). Unbound regardless, the key would lose
 * that live object: a get of it would answer ENOENT, the next create
 * would make a second object for the one key, and the one made again
 * would be in no key entry, so nothing would remove it. Hence under the
 * lock, and only if the system key names nothing now: every create
 * happens under the lock, so none can come between the check and the
 * unbind. (A removed segment that is still attached has key IPC_PRIVATE
 * in the kernel: its system key names nothing, and it is unbound.)
 * Without the lock, the binding stays: create_keyed unbinds a key whose
 * object is gone. */
static void unbind_removed_key(const struct ipc_kind *k, key_t skey) {
  int32_t v;
  if (skey == IPC_PRIVATE || !appshot_s2v(g_h, k->key, skey, &v)) return;
  struct appshot_held saved;
  if (appshot_lock(g_h, &saved) != 0) return;
  if (appshot_s2v(g_h, k->key, skey, &v) && raw_get(k, skey, 0, 0) == -ENOENT)
    appshot_unmap_system_locked(g_h, k->key, skey);
  appshot_unlock(g_h, &saved);
}

/* --- Semaphore undo (SEM_UNDO) adjustments ------------------------------
 *
 * The kernel keeps, per process, the adjustment each SEM_UNDO operation
 * leaves (semadj: minus the sum of its sem_op) and applies it when the
 * process exits: a holder killed releases its semaphore (apache's accept
 * mutex relies on that). /proc does not show it, so a snapshot cannot read
 * it: the library sums it here, by virtual set and semaphore number, for
 * the snapshot to read (src/resources/sysv.ts holds to this layout).
 *
 * What the kernel does to semadj besides, and what the table does then:
 *  - SETVAL and SETALL zero it for that semaphore in every process, and
 *    IPC_RMID drops it with the set: the library counts them in the
 *    tables' sem_generation, which all processes share. An entry written
 *    at another generation may have been zeroed or not (the count does not
 *    say which semaphore): it makes the process's undo state unknown at
 *    its next operation. A generation that moves while the operation
 *    itself is made does too. An entry of a set the tables no longer name
 *    went with the set (IPC_RMID): freed when the table is full.
 *  - fork: the child starts with none. Its copy of the table names the
 *    parent as owner (its virtual PID, which a restore keeps): the child's
 *    first write starts it empty, and the snapshot reads a table whose
 *    owner is another process as empty. Threads share the table as the
 *    kernel shares semadj among them (CLONE_SYSVSEM, as pthreads do).
 *    Memory shared with another process (a clone with CLONE_VM, g_nocache)
 *    cannot be told apart from a fork's copy: unknown.
 *  - more than SEM_UNDO_MAX semaphores with an adjustment at once:
 *    unknown. An entry whose adjustment is back to 0 is taken for
 *    another semaphore when none is free, so a process may use any
 *    number of semaphores over its life.
 *  - exec keeps semadj but not this table: a process that executes another
 *    program while its table holds an adjustment, or cannot know them, is
 *    marked in the tables (APPSHOT_F_SEM_UNDO_EXEC: sem_undo_before_exec),
 *    and the snapshot refuses it.
 *
 * Lock-free: threads and signal handlers write it, and a snapshot reads it
 * from outside with every thread stopped wherever it was. An entry (key
 * and value, 16 bytes) only ever changes whole, by one compare-and-swap of
 * both words (cmpxchg16b): a stopped thread has written all of it or none,
 * and a writer that read an entry before another freed and claimed it
 * again fails its swap unless the entry is exactly as it read it (then the
 * same semaphore at the same adjustment: nothing to tell apart). An entry
 * whose adjustment is back to 0 stays its semaphore's for the next
 * operation, and is taken by another semaphore when none is free. Two
 * threads may claim entries for one semaphore at once (each found none):
 * the later claimer, which sees both, merges the later entry into the
 * first, having marked it (SEM_UNDO_MOVING in its key, which hides it from
 * writers), adding its adjustment to the first, then freeing it. In
 * between the table shows two entries of the semaphore, or a marked one:
 * the snapshot refuses such a table (a write under way), never sums it. */
#define SEM_UNDO_MAX 64
struct sem_undo_entry {
  uint64_t key;   /* (uint32)virtual set id << 32 | (semnum + 1); 0 free */
  uint64_t value; /* generation << 32 | (uint32)adjustment */
} __attribute__((aligned(16)));
struct appshot_sem_undo {
  /* Low half: the virtual PID whose table this is (other: empty; -1 being
   * emptied); high half: non-zero if the kernel's semadj cannot be known.
   * One word, so that emptying it and marking it unknown cannot cross. */
  uint64_t state;
  int32_t capacity; /* SEM_UNDO_MAX */
  int32_t layout;   /* 1: the two words after the entries are there (0: older);
                     * 2: and each thread's note holds its stub's stack
                     * pointer (struct appshot_semop_flight, sp) */
  struct sem_undo_entry entry[SEM_UNDO_MAX];
  /* Where each thread's semop in flight is, from its thread pointer (0
   * until the process's first semop), and where that semop's system call
   * returns to (a thread blocked in it has its instruction pointer there):
   * "A semop in flight" below. */
  int64_t flight_tpoff;
  const void *semop_returned;
};
/* The layout src/resources/sysv.ts reads; cmpxchg16b faults on an entry
 * not 16-byte aligned. */
_Static_assert(__builtin_offsetof(struct appshot_sem_undo, entry) == 16 &&
                   sizeof(struct sem_undo_entry) == 16 && _Alignof(struct appshot_sem_undo) == 16 &&
                   __builtin_offsetof(struct appshot_sem_undo, flight_tpoff) == 16 + 16 * SEM_UNDO_MAX &&
                   __builtin_offsetof(struct appshot_sem_undo, semop_returned) == 24 + 16 * SEM_UNDO_MAX,
               "SEM_UNDO table layout");
/* The instruction after the semop system call (the stub below). */
extern const char appshot_semop_returned[] HIDDEN;
static struct appshot_sem_undo g_sem_undo = {0, SEM_UNDO_MAX, 2, {{0, 0}}, 0, appshot_semop_returned};
extern struct appshot_sem_undo appshot_sem_undo
    __attribute__((alias("g_sem_undo"), visibility("default")));

/* In a key: the entry is being merged into another of its semaphore
 * (semnum + 1 is at most 65536). */
#define SEM_UNDO_MOVING (1ull << 31)

int g_sem_undo_split;

static uint32_t sem_generation(void) {
  return __atomic_load_n(&g_h->sem_generation, __ATOMIC_ACQUIRE);
}

/* SETVAL, SETALL or IPC_RMID made: every process's adjustments of the set
 * may be gone. Counted after the call (an entry written between the call
 * and the count is only taken as unknown). */
static void sem_generation_bump(void) {
  __atomic_add_fetch(&g_h->sem_generation, 1, __ATOMIC_ACQ_REL);
}

#define SEM_UNDO_OWNER 0xffffffffull
#define SEM_UNDO_EMPTYING SEM_UNDO_OWNER /* owner -1 */
#define SEM_UNDO_UNKNOWN (1ull << 32)

void sem_undo_unknown(void) {
  __atomic_or_fetch(&g_sem_undo.state, SEM_UNDO_UNKNOWN, __ATOMIC_ACQ_REL);
}

/* This process's table: emptied first if it is a fork's copy of the
 * parent's (0: it cannot be told, the caller marks it unknown). One thread
 * empties it, having set owner -1 and cleared unknown in one step; another
 * thread (or a handler) writing meanwhile only marks it unknown, which the
 * emptying keeps: entries it cleared after another's write would
 * otherwise be lost. A fork while another thread empties it leaves the
 * child's copy at -1: unknown, never wrong. */
static inline __attribute__((always_inline)) int sem_undo_own(void) {
  const uint64_t me = (uint32_t)self_vpid();
  uint64_t s = __atomic_load_n(&g_sem_undo.state, __ATOMIC_ACQUIRE);
  if ((s & SEM_UNDO_OWNER) == me) return 1;
  if (__atomic_load_n(&g_nocache, __ATOMIC_RELAXED)) return 0;
  if ((s & SEM_UNDO_OWNER) == SEM_UNDO_EMPTYING ||
      !__atomic_compare_exchange_n(&g_sem_undo.state, &s, SEM_UNDO_EMPTYING, 0,
                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    return 0;
  for (int i = 0; i < SEM_UNDO_MAX; i++) {
    __atomic_store_n(&g_sem_undo.entry[i].key, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_sem_undo.entry[i].value, 0, __ATOMIC_RELAXED);
  }
  s = __atomic_load_n(&g_sem_undo.state, __ATOMIC_ACQUIRE);
  while (!__atomic_compare_exchange_n(&g_sem_undo.state, &s, (s & ~SEM_UNDO_OWNER) | me, 0,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
  return 1;
}

/* Before an exec (preload_exec.c): the kernel keeps this process's
 * adjustments, the next program's table will not know them; marked for
 * the snapshot to refuse (review r257: read as none, they were lost, and a
 * holder killed after the restore left its semaphore taken for ever). A
 * table that is another process's (a fork's copy) holds none of ours. An
 * exec that fails leaves the mark: a refusal too many, never one too few. */
static int semop_note_maybe_made(void);
void sem_undo_before_exec(void) {
  if (!g_h) return;
  uint64_t s = __atomic_load_n(&g_sem_undo.state, __ATOMIC_ACQUIRE);
  /* The exec made inside this thread's semop, by a handler the library
   * does not wrap: an adjustment the kernel made and the table does not
   * hold yet is kept by the kernel too (review r279: read as none). */
  int held = (s & SEM_UNDO_UNKNOWN) != 0 || (s & SEM_UNDO_OWNER) == SEM_UNDO_EMPTYING ||
             __atomic_load_n(&g_sem_undo_split, __ATOMIC_RELAXED) || semop_note_maybe_made();
  if (!held && (s & SEM_UNDO_OWNER) == (uint32_t)self_vpid())
    for (int i = 0; i < SEM_UNDO_MAX && !held; i++)
      held = __atomic_load_n(&g_sem_undo.entry[i].key, __ATOMIC_ACQUIRE) != 0 &&
             (int32_t)__atomic_load_n(&g_sem_undo.entry[i].value, __ATOMIC_ACQUIRE) != 0;
  if (held) appshot_set_flags(g_h, APPSHOT_PID, (int32_t)SYS0(getpid), APPSHOT_F_SEM_UNDO_EXEC);
}

/* cmpxchg16b, which x86-64 processors have had since 2006 (checked once:
 * without it every adjustment is unknown, never torn). */
static int sem_undo_cas_ok(void) {
  static int ok; /* 0 not asked, 1 yes, -1 no: asked again by a racer, same answer */
  int v = __atomic_load_n(&ok, __ATOMIC_RELAXED);
  if (!v) {
    unsigned a, b, c, d;
    v = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_CMPXCHG16B) ? 1 : -1;
    __atomic_store_n(&ok, v, __ATOMIC_RELAXED);
  }
  return v > 0;
}

/* Entry *e becomes `want` if it is `*seen`; else *seen is what it is. */
static int entry_swap(struct sem_undo_entry *e, struct sem_undo_entry *seen,
                      struct sem_undo_entry want) {
  _Bool done;
  __asm__ __volatile__("lock cmpxchg16b %1"
                       : "=@ccz"(done), "+m"(*e), "+a"(seen->key), "+d"(seen->value)
                       : "b"(want.key), "c"(want.value)
                       : "memory");
  return done;
}

/* An entry as a start for entry_swap (its two words may be of different
 * moments: the swap tells). */
static struct sem_undo_entry entry_read(const struct sem_undo_entry *e) {
  struct sem_undo_entry r = {__atomic_load_n(&e->key, __ATOMIC_ACQUIRE),
                             __atomic_load_n(&e->value, __ATOMIC_ACQUIRE)};
  return r;
}

/* The first entry of `key` (unmarked), or -1. */
static int entry_find(uint64_t key) {
  for (int i = 0; i < SEM_UNDO_MAX; i++)
    if (__atomic_load_n(&g_sem_undo.entry[i].key, __ATOMIC_ACQUIRE) == key) return i;
  return -1;
}

/* Adds `delta` to entry *e of `key` at generation `gen`: 1 done, 0 it
 * holds another key now (look again), -1 unknown (written at another
 * generation, maybe zeroed since). Back at 0, it stays the semaphore's
 * (its next operation finds it) until another semaphore needs it. */
static int entry_add(struct sem_undo_entry *e, uint64_t key, int32_t delta, uint32_t gen) {
  struct sem_undo_entry seen = entry_read(e);
  for (;;) {
    if (seen.key != key) return 0;
    int32_t adj = (int32_t)(uint32_t)seen.value;
    if ((uint32_t)(seen.value >> 32) != gen && adj != 0) {
      /* Its two words were read apart (the key of one moment, the value
       * of a later one: another semaphore's, reused): only the entry as a
       * whole may make the process unknown, for good. */
      if (entry_swap(e, &seen, seen)) return -1;
      continue;
    }
    adj += delta;
    const struct sem_undo_entry want = {key, (uint64_t)gen << 32 | (uint32_t)adj};
    if (entry_swap(e, &seen, want)) return 1;
  }
}

/* An entry claimed for `key` with `delta` at `gen`, a free one, else one
 * of another semaphore whose adjustment is 0 (unmarked): 1; 0 none; -2
 * another thread claimed the entry aimed at for `key` first (look again,
 * rather than make a second entry to merge). */
static int entry_claim(uint64_t key, int32_t delta, uint32_t gen) {
  const struct sem_undo_entry want = {key, (uint64_t)gen << 32 | (uint32_t)delta};
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < SEM_UNDO_MAX; i++) {
      struct sem_undo_entry seen = entry_read(&g_sem_undo.entry[i]);
      for (;;) {
        if (pass == 0 ? seen.key != 0
                      : seen.key == key || (seen.key & SEM_UNDO_MOVING) ||
                            (int32_t)(uint32_t)seen.value != 0)
          break;
        if (entry_swap(&g_sem_undo.entry[i], &seen, want)) return 1;
        if (seen.key == key) return -2;
      }
    }
  return 0;
}

/* Frees the entries of sets the tables no longer name: IPC_RMID dropped
 * their adjustments with them (whoever removed them; the call unmaps the
 * id after the kernel removed the set). A set made again at the same
 * virtual id keeps the entry: written at an older generation, it is
 * unknown at the next operation. Returns how many were freed. */
static int entries_of_removed_sets_freed(void) {
  int freed = 0;
  for (int i = 0; i < SEM_UNDO_MAX; i++) {
    struct sem_undo_entry seen = entry_read(&g_sem_undo.entry[i]);
    int32_t sid;
    if (seen.key == 0 || (seen.key & SEM_UNDO_MOVING) ||
        appshot_v2s(g_h, APPSHOT_SEMID, (int32_t)(seen.key >> 32), &sid))
      continue;
    freed += entry_swap(&g_sem_undo.entry[i], &seen, (struct sem_undo_entry){0, 0});
  }
  return freed;
}

/* Two entries of `key` (two threads claimed one each): each later one is
 * merged into the first. Marked first, so that no writer changes it and
 * no other merger moves it too; its adjustment added to the first entry of
 * the key there is then (the table counts it twice, but shows the mark);
 * then freed. With no other entry of the key left, the mark is taken off
 * and the table looked at again. */
static void entries_merged(uint64_t key) {
  for (;;) {
    int first = -1, later = -1;
    for (int i = 0; i < SEM_UNDO_MAX && later < 0; i++)
      if (__atomic_load_n(&g_sem_undo.entry[i].key, __ATOMIC_ACQUIRE) == key) {
        if (first < 0) first = i;
        else later = i;
      }
    if (later < 0) return;
    struct sem_undo_entry *e = &g_sem_undo.entry[later];
    struct sem_undo_entry seen = entry_read(e);
    if (seen.key != key) continue;
    const struct sem_undo_entry marked = {key | SEM_UNDO_MOVING, seen.value};
    if (!entry_swap(e, &seen, marked)) continue;
    const int32_t adj = (int32_t)(uint32_t)marked.value;
    const uint32_t gen = (uint32_t)(marked.value >> 32);
    int r = 0;
    for (int to; r == 0 && (to = entry_find(key)) >= 0;)
      r = entry_add(&g_sem_undo.entry[to], key, adj, gen); /* 0 stays there */
    if (r > 0) test_pause("sem-undo-merged"); /* counted twice, marked */
    /* Only this merger writes a marked entry. */
    struct sem_undo_entry now = marked;
    if (r > 0) entry_swap(e, &now, (struct sem_undo_entry){0, 0});
    else entry_swap(e, &now, (struct sem_undo_entry){key, marked.value});
    if (r < 0) {
      sem_undo_unknown(); /* two generations: one may have been zeroed */
      return;
    }
  }
}

/* The kernel's semadj of (vid, num) moved by `delta`, at generation `gen`. */
static inline __attribute__((always_inline)) void sem_undo_add(int32_t vid, unsigned num, int32_t delta, uint32_t gen) {
  const uint64_t key = (uint64_t)(uint32_t)vid << 32 | ((uint64_t)num + 1);
  if (!sem_undo_cas_ok()) {
    sem_undo_unknown();
    return;
  }
  int claimed = 0;
  for (int full = 0;;) {
    int i = entry_find(key);
    if (i < 0) test_pause("sem-undo-claim");
    int r = i >= 0 ? entry_add(&g_sem_undo.entry[i], key, delta, gen)
                   : entry_claim(key, delta, gen);
    if (r > 0) {
      claimed = i < 0;
      break;
    }
    if (r == -2) continue;
    if (r < 0 || (i < 0 && (full++ || !entries_of_removed_sets_freed()))) {
      sem_undo_unknown();
      return;
    }
  }
  /* Only a claim makes a second entry of a semaphore: of two made at
   * once, the later claimer's look sees both. */
  if (claimed) entries_merged(key);
}

/* The first of `n` operations that changes a semaphore with SEM_UNDO, or
 * `n`. Read after the kernel took them: the array is valid then, and a
 * bad pointer still gets its EFAULT. */
static inline size_t first_undo(const struct sembuf *ops, size_t n) {
  size_t i;
  for (i = 0; i < n; i++)
    if ((ops[i].sem_flg & SEM_UNDO) && ops[i].sem_op != 0) break;
  return i;
}

/* After a successful semop of the virtual set `vid`: its SEM_UNDO
 * operations' adjustments from ops[i] on, the generation read before the
 * call `before`. */
static inline __attribute__((always_inline)) void sem_undo_record(int32_t vid, const struct sembuf *ops, size_t i,
                            size_t n, uint32_t before) {
  /* A thread with its own adjustments in the kernel (clone without
   * CLONE_SYSVSEM) writes here as well: whose is whose cannot be told,
   * and summed as the process's, the thread's would be given back to
   * the whole process at restore (review r257). */
  if (__atomic_load_n(&g_sem_undo_split, __ATOMIC_RELAXED) || !sem_undo_own()) {
    sem_undo_unknown();
    return;
  }
  if (sem_generation() != before) {
    sem_undo_unknown(); /* zeroed before or after ours: cannot tell */
    return;
  }
  for (; i < n; i++)
    if ((ops[i].sem_flg & SEM_UNDO) && ops[i].sem_op != 0)
      sem_undo_add(vid, ops[i].sem_num, -(int32_t)ops[i].sem_op, before);
}

/* --- A semop in flight ----------------------------------------------------
 *
 * The kernel changes semadj inside the system call; the table above is
 * written after it returns. A snapshot lets a thread inside that gap run
 * on (a translation window), unless the thread is blocked in a system
 * call there, which only a signal handler that interrupted it can do (or
 * a test pause): frozen so, the table showed neither the adjustment nor a
 * write under way, and the snapshot carried the process without it
 * (review r267). So each thread notes the semop it is making (t_semop,
 * preload.h), the system call is made here, at a known address, and:
 *  - the signal stub (preload_signal.c) asks semop_unrecorded() first: a
 *    signal taken after the kernel made the operation (at the return
 *    address with 0 in rax, or later, the result noted) and before the
 *    table holds it does not run the program's handler then; the stub
 *    queues the signal again to the thread, blocked, and returns; the
 *    write ends and unblocks it (semop_deferred_release), and the handler
 *    runs with the table whole. Any other signal runs its handler at
 *    once: a thread blocked in its semop (an apache child waiting for the
 *    accept mutex) is interrupted as before.
 *  - a snapshot reads each thread's note: a thread stopped with an
 *    operation made and not written (it can only be blocked in a handler
 *    the library does not wrap, or at a test pause) is refused by name;
 *    one blocked in this semop, or before it, is taken.
 * Nested (a handler's semop inside a thread's): the stub clears the note
 * while the program's handler runs (semop_suspend) and puts it back
 * after; a semop that finds one pending under it (a handler the library
 * does not wrap) makes the table unknown. No allocation, no lock: a few
 * stores to the thread's own memory per semop. */
__thread struct appshot_semop_flight t_semop;

/* semtimedop(sid, ops, n, timeout) as a raw system call whose return
 * address is appshot_semop_returned. The note says "made" (ISSUED, result
 * 1) from the instruction before the call; the result is noted by the
 * first instruction after it, so that a signal there finds it in rax. */
HIDDEN long semop_syscall(long sid, struct sembuf *ops, size_t n, const struct timespec *timeout);
__asm__(".text\n"
        ".globl semop_syscall\n"
        ".hidden semop_syscall\n"
        ".type semop_syscall, @function\n"
        "semop_syscall:\n"
        "  .cfi_startproc\n"
        "  endbr64\n"
        "  movq t_semop@gottpoff(%rip), %r8\n"
        "  movq %rcx, %r10\n"
        "  movl $220, %eax\n" /* SYS_semtimedop */
        "  movq $1, %fs:8(%r8)\n"
        "  movq %rsp, %fs:40(%r8)\n"
        "  movl $1, %fs:(%r8)\n" /* SEMOP_ISSUED */
        "  syscall\n"
        ".globl appshot_semop_returned\n"
        ".hidden appshot_semop_returned\n"
        "appshot_semop_returned:\n"
        "  movq %rax, %fs:8(%r8)\n"
        "  ret\n"
        ".globl appshot_semop_end\n"
        ".hidden appshot_semop_end\n"
        "appshot_semop_end:\n"
        "  .cfi_endproc\n"
        ".size semop_syscall, .-semop_syscall\n");
_Static_assert(__builtin_offsetof(struct appshot_semop_flight, result) == 8 &&
                   __builtin_offsetof(struct appshot_semop_flight, sp) == 40 &&
                   SEMOP_ISSUED == 1,
               "the stub's offsets");

/* After the call made the operation: the note from ISSUED to RECORDING,
 * in one instruction (a signal comes before it or after it), unless it
 * is no longer ISSUED: made idle in a fork's child (the parent's
 * operation, semop_after_fork_child) or settled by a jump's wrapper
 * (written there). 1 if the write is this semop's to make. */
static inline __attribute__((always_inline)) int semop_note_recording(void) {
  int32_t seen = SEMOP_ISSUED;
  __asm__ volatile("cmpxchgl %[to], %[state]"
                   : [state] "+m"(t_semop.state), "+a"(seen)
                   : [to] "r"((int32_t)SEMOP_RECORDING)
                   : "memory", "cc");
  return seen == SEMOP_ISSUED;
}

static inline int semop_pending(int32_t state, int64_t result) {
  return state == SEMOP_RECORDING || (state == SEMOP_ISSUED && result == 0);
}

extern const char appshot_semop_end[] HIDDEN;

int semop_unrecorded(const void *uc) {
  const int32_t state = __atomic_load_n(&t_semop.state, __ATOMIC_RELAXED);
  int64_t result = __atomic_load_n(&t_semop.result, __ATOMIC_RELAXED);
  if (state == SEMOP_ISSUED && uc) {
    const mcontext_t *m = &((const ucontext_t *)uc)->uc_mcontext;
    if ((uintptr_t)m->gregs[REG_RIP] == (uintptr_t)appshot_semop_returned) result = m->gregs[REG_RAX];
  }
  return semop_pending(state, result);
}

/* Interrupted outside the stub with the call's result not seen, the
 * thread runs a handler the library does not wrap that interrupted the
 * stub (or a jump's settle of that semop): whether the call was made is
 * in that handler's frame, which only a jump out of it settles ("A jump
 * out of a semop"). A handler of ours that runs there keeps the note, so
 * that its own jump out settles it too: put aside while it ran, a
 * siglongjmp out of it left the adjustment in neither place (review
 * r279). Its own semop finds the note under it (do_semtimedop). */
int semop_under_unwrapped_handler(const void *uc) {
  if (__atomic_load_n(&t_semop.state, __ATOMIC_RELAXED) != SEMOP_ISSUED ||
      __atomic_load_n(&t_semop.result, __ATOMIC_RELAXED) != 1 || !uc)
    return 0;
  const uintptr_t rip = (uintptr_t)((const ucontext_t *)uc)->uc_mcontext.gregs[REG_RIP];
  return rip < (uintptr_t)semop_syscall || rip >= (uintptr_t)appshot_semop_end;
}

void semop_suspend(struct semop_suspended *s) {
  s->state = t_semop.state;
  s->result = t_semop.result;
  s->ops = t_semop.ops;
  s->nops = t_semop.nops;
  s->sp = t_semop.sp;
  s->vid = t_semop.vid;
  s->generation = t_semop.generation;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_semop.state = SEMOP_IDLE;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

void semop_resume(const struct semop_suspended *s) {
  t_semop.state = SEMOP_IDLE;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_semop.result = s->result;
  t_semop.ops = s->ops;
  t_semop.nops = s->nops;
  t_semop.sp = s->sp;
  t_semop.vid = s->vid;
  t_semop.generation = s->generation;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_semop.state = s->state;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The signals held while the write went on, unblocked: queued again to
 * this thread, their handlers run now. */
static void semop_deferred_release(void) {
  uint64_t held = __atomic_exchange_n(&t_semop.deferred, 0, __ATOMIC_RELAXED);
  if (held) SYS4(rt_sigprocmask, SIG_UNBLOCK, &held, NULL, sizeof held);
}

/* The same from a handler that runs now (translating_action): the held
 * signals are blocked in the mask of every context since the one held
 * (the stub added them to its frame's), this handler's frame among them.
 * Released only by the semop's end, a semop of this handler would unblock
 * them here and the handler's return block them again, for good; a
 * handler that leaves by a longjmp would leave them blocked and never
 * released (review r272). So they are released here, and taken out of
 * the mask this handler returns to: the write is over (the thread was
 * interrupted between it and the release) or cannot be waited for (the
 * table is unknown: a fault, a one-shot handler). */
void semop_held_release(void *uc) {
  uint64_t held = __atomic_exchange_n(&t_semop.deferred, 0, __ATOMIC_RELAXED);
  if (!held) return;
  if (uc) {
    uint64_t *mask = (uint64_t *)(void *)&((ucontext_t *)uc)->uc_sigmask;
    *mask &= ~held;
  }
  SYS4(rt_sigprocmask, SIG_UNBLOCK, &held, NULL, sizeof held);
}

/* --- A jump out of a semop -----------------------------------------------
 *
 * A handler the library does not wrap (installed by a raw rt_sigaction
 * system call, or before the library) that interrupts the thread's semop
 * and leaves by a longjmp never lets the semop end: its note stayed "made"
 * (ISSUED, the result not seen) or "being written" for good, and every
 * later snapshot of the process was refused. So the jumps (preload_jump.c)
 * settle the note of a semop they leave, before they jump:
 *  - the result seen (the stub noted it): made if 0, its adjustments
 *    written now (the operations are still there: the jump has not been
 *    made yet), else nothing was made;
 *  - not seen: the signal came inside the stub. The kernel saved the
 *    interrupted registers in the signal frame it built below the stub's
 *    stack pointer (past the 128-byte red zone and the extended state) or
 *    at the top of the sigaltstack: the frame whose saved stack pointer is
 *    the stub's (noted in t_semop.sp) and instruction pointer inside the
 *    stub tells: before the system call, nothing made; at its return, made
 *    if rax is 0 (rcx, which the syscall instruction loads with the return
 *    address, checked too). Looked for only where the stack between is
 *    known to be mapped (from the jump's own stack pointer up, on the same
 *    stack; or the sigaltstack);
 *  - being written, or no frame found: the table is marked unknown (a
 *    snapshot refuses it by name), never guessed.
 * The note is then idle, and signals held for the write are let go. No
 * allocation, no lock; a system call only to let held signals go. */
enum { FRAME_REACH = 64 << 10 }; /* the extended state is ~11 KiB with AMX */

/* Whether the page at `page` can be read: asked of the kernel (a plain
 * read of an unmapped one kills the program). A stack taken for one the
 * thread runs on may not be (a note left stale by a jump the library
 * did not see, such as setcontext, read from a coroutine's stack; a small
 * thread stack's guard page within the reach below): review r279. A copy
 * the system refuses (a seccomp filter) leaves the page taken as there. */
static int page_readable(uintptr_t page) {
  uint64_t w;
  return copy_in(&w, (const void *)page, sizeof w) != -EFAULT;
}

/* Whether the frame of a signal that interrupted the stub at stack pointer
 * `sp` is in [lo, hi): 1 made, 0 not made, -1 no such frame. */
static int semop_frame_in(uintptr_t lo, uintptr_t hi, uintptr_t sp) {
  const uintptr_t start = (uintptr_t)semop_syscall, returned = (uintptr_t)appshot_semop_returned,
                  end = (uintptr_t)appshot_semop_end;
  enum { PAGE = 4096 };
  if (hi < lo + 24) return -1;
  uintptr_t readable = (hi - 1) & ~(uintptr_t)(PAGE - 1); /* pages from here up checked */
  if (!page_readable(readable)) return -1;
  /* The saved rsp and rip are consecutive words (REG_RSP, REG_RIP), with
   * rcx and rax the two before them. */
  for (uintptr_t p = (hi - 16) & ~(uintptr_t)7; p >= lo + 16; p -= 8) {
    if (p - 16 < readable) {
      readable = (p - 16) & ~(uintptr_t)(PAGE - 1);
      if (!page_readable(readable)) return -1;
    }
    const volatile uintptr_t *w = (const volatile uintptr_t *)p;
    if (w[0] != sp) continue;
    const uintptr_t rip = w[1];
    if (rip < start || rip >= end) continue;
    if (rip < returned) return 0; /* before the system call */
    if (rip == returned && w[-1] == returned) return w[-2] == 0;
  }
  return -1;
}

/* The same, where such a frame can be: see above. `here` is the caller's
 * stack pointer, below any frame on its own stack. */
static int semop_made_in_frame(uintptr_t sp, uintptr_t here, uintptr_t alt, uintptr_t alt_size) {
  const int sp_alt = sp - alt < alt_size, here_alt = here - alt < alt_size;
  int r = -1;
  if (sp_alt == here_alt && here < sp - 128) {
    uintptr_t lo = sp - 128 - FRAME_REACH > here && sp - 128 > FRAME_REACH ? sp - 128 - FRAME_REACH : here;
    r = semop_frame_in(lo, sp - 128, sp);
  }
  if (r < 0 && alt_size && !sp_alt) {
    uintptr_t lo = here_alt && here > alt ? here : alt;
    r = semop_frame_in(lo, alt + alt_size, sp);
  }
  return r;
}

static void sigaltstack_of_thread(uintptr_t *alt, uintptr_t *alt_size) {
  stack_t ss;
  *alt = *alt_size = 0;
  if (SYS2(sigaltstack, NULL, &ss) == 0 && !(ss.ss_flags & SS_DISABLE)) {
    *alt = (uintptr_t)ss.ss_sp;
    *alt_size = ss.ss_size;
  }
}

/* A semop over one that a handler the library does not wrap interrupted
 * (suspended in `outer`): whether the outer one may have been made and
 * not written (its write cannot be made here: it would be made again when
 * the handler returns to it). */
static int outer_semop_maybe_made(const struct semop_suspended *outer) {
  if (outer->state != SEMOP_ISSUED || outer->result != 1) return semop_pending(outer->state, outer->result);
  uintptr_t alt, alt_size, here;
  __asm__("mov %%rsp, %0" : "=r"(here));
  sigaltstack_of_thread(&alt, &alt_size);
  return semop_made_in_frame(outer->sp, here, alt, alt_size) != 0;
}

/* Cold, and the write inlined by force: with this second caller GCC kept
 * the write out of line, ~20 instructions more on every semop with
 * SEM_UNDO (callgrind). */
__attribute__((cold)) void semop_left_by_jump(uintptr_t target, uintptr_t here, uintptr_t alt,
                                              uintptr_t alt_size) {
  const int32_t state = __atomic_load_n(&t_semop.state, __ATOMIC_RELAXED);
  if (state == SEMOP_IDLE) return;
  const uintptr_t sp = t_semop.sp;
  const int sp_alt = sp - alt < alt_size, target_alt = target - alt < alt_size;
  if (!(sp_alt == target_alt ? sp < target : sp_alt)) return; /* a jump inside the handler */
  const int64_t result = t_semop.result;
  int made = state == SEMOP_RECORDING ? -1
             : result != 1            ? result == 0
                                      : semop_made_in_frame(sp, here, alt, alt_size);
  if (made > 0) {
    const struct sembuf *ops = (const struct sembuf *)(uintptr_t)t_semop.ops;
    const size_t n = t_semop.nops;
    size_t i = first_undo(ops, n);
    if (i < n) {
      __atomic_store_n(&t_semop.state, SEMOP_RECORDING, __ATOMIC_RELAXED);
      __atomic_signal_fence(__ATOMIC_SEQ_CST);
      int saved = errno;
      sem_undo_record(t_semop.vid, ops, i, n, t_semop.generation);
      errno = saved;
    }
  } else if (made < 0) {
    sem_undo_unknown();
  }
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&t_semop.state, SEMOP_IDLE, __ATOMIC_RELAXED);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  semop_deferred_release();
}

/* For an exec (sem_undo_before_exec): whether this thread's semop in
 * flight may have been made and not written (the operations are not
 * looked at: a note left stale may point at memory long gone). */
static int semop_note_maybe_made(void) {
  const int32_t state = __atomic_load_n(&t_semop.state, __ATOMIC_RELAXED);
  if (LIKELY(state == SEMOP_IDLE)) return 0;
  if (state != SEMOP_ISSUED) return 1;
  if (t_semop.result != 1) return t_semop.result == 0;
  uintptr_t alt, alt_size, here;
  __asm__("mov %%rsp, %0" : "=r"(here));
  sigaltstack_of_thread(&alt, &alt_size);
  return semop_made_in_frame(t_semop.sp, here, alt, alt_size) != 0;
}

/* A fork's child, its one thread: a semop the fork came inside of (a
 * handler the library does not wrap interrupted it, and forked). The
 * kernel's adjustment of an operation made before the fork is the
 * parent's alone (a fork inherits no semadj): the child, returning to
 * the semop or leaving it by a jump, must not write it in its own table
 * (review r279: both processes carried it, and restored, both would give
 * it back). Its note is made idle, which the semop's write checks
 * (semop_note_recording). Not made yet, the note stays: the child makes
 * the call itself when the handler returns. Being written, or not to be
 * told, the child's table is marked unknown. */
void semop_after_fork_child(void) {
  const int32_t state = __atomic_load_n(&t_semop.state, __ATOMIC_RELAXED);
  if (LIKELY(state == SEMOP_IDLE)) return;
  const int64_t result = t_semop.result;
  int made = -1;
  if (state == SEMOP_ISSUED && result != 1) made = result == 0;
  else if (state == SEMOP_ISSUED) {
    uintptr_t alt, alt_size, here;
    __asm__("mov %%rsp, %0" : "=r"(here));
    sigaltstack_of_thread(&alt, &alt_size);
    made = semop_made_in_frame(t_semop.sp, here, alt, alt_size);
  }
  if (made == 0) return;
  if (made < 0) {
    if (g_h) sem_undo_own(); /* the parent's copy emptied first: the mark then stays */
    sem_undo_unknown();
  }
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&t_semop.state, SEMOP_IDLE, __ATOMIC_RELAXED);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

long do_semtimedop(int id, struct sembuf *ops, size_t n,
                   const struct timespec *timeout) {
  ID_WINDOW();
  int sid;
  if (!id_arg(APPSHOT_SEMID, id, &sid)) return -1;
  if (!g_h) return REAL(semtimedop)(sid, ops, n, timeout);
  if (UNLIKELY(!__atomic_load_n(&g_sem_undo.flight_tpoff, __ATOMIC_RELAXED))) {
    char *tp; /* the thread pointer (the TCB's first word holds it) */
    __asm__("mov %%fs:0, %0" : "=r"(tp));
    __atomic_store_n(&g_sem_undo.flight_tpoff, (int64_t)((char *)&t_semop - tp), __ATOMIC_RELEASE);
  }
  /* A semop of a handler the library does not wrap, over one made and
   * not written: that one stays unwritten while this one runs. */
  struct semop_suspended outer;
  semop_suspend(&outer);
  if (UNLIKELY(outer.state != SEMOP_IDLE) && outer_semop_maybe_made(&outer)) sem_undo_unknown();
  t_semop.ops = (uintptr_t)ops;
  t_semop.nops = n;
  t_semop.vid = id;
  /* Inside the window: a snapshot lets a thread that has made the call
   * run on until it has recorded it. */
  uint32_t before = sem_generation();
  t_semop.generation = before;
  long r = semop_syscall(sid, ops, n, timeout);
  size_t i;
  if (r == 0 && (i = first_undo(ops, n)) < n && semop_note_recording()) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    int saved = errno;
    sem_undo_record(id, ops, i, n, before);
    errno = saved;
  }
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  if (LIKELY(outer.state == SEMOP_IDLE)) __atomic_store_n(&t_semop.state, SEMOP_IDLE, __ATOMIC_RELAXED);
  else semop_resume(&outer);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  if (UNLIKELY(__atomic_load_n(&t_semop.deferred, __ATOMIC_RELAXED)) &&
      !semop_pending(outer.state, outer.result))
    semop_deferred_release();
  return libc_ret(r);
}

API int semop(int id, struct sembuf *ops, size_t n) {
  return (int)do_semtimedop(id, ops, n, NULL);
}

API int semtimedop(int id, struct sembuf *ops, size_t n,
                   const struct timespec *timeout) {
  return (int)do_semtimedop(id, ops, n, timeout);
}

/* SEM_INFO, SHM_INFO and MSG_INFO (ipcs -u) count the kernel's objects,
 * every application's and the system's: the counts in them are made the
 * application's own (sysv_usage, from /proc/sysvipc; when it cannot be
 * read, the kernel's stay). What stays the kernel's: the return value, the
 * highest index in use, which ipcs walks with *_STAT (only the
 * application's objects answer there; which index an id has depends on
 * the kernel's ipcmni_extend, so the application's own highest one is not
 * known from /proc), and IPC_INFO, the system's limits and the same index. Neither
 * names an object; the index says only that the system has used one that
 * high. */
long do_semctl(int id, int num, int cmd, union semun arg) {
  ID_WINDOW();
  ensure_init();
  if (!g_h) return REAL(semctl)(id, num, cmd, arg);
  long r;
  switch (cmd) {
    case IPC_INFO:
      return REAL(semctl)(id, num, cmd, arg);
    case SEM_INFO: {
      r = REAL(semctl)(id, num, cmd, arg);
      struct sysv_usage u;
      if (r >= 0 && sysv_usage(APPSHOT_SEMID, &u)) {
        struct seminfo *info = arg.__buf;
        info->semusz = (int)u.objects;
        info->semaem = (int)u.sum[0];
      }
      return r;
    }
    case SEM_STAT:
    case SEM_STAT_ANY:
      /* No PID in a struct semid_ds: GETPID asks by id. */
      r = stat_index_result(APPSHOT_SEMID, REAL(semctl)(id, num, cmd, arg));
      if (r >= 0) arg.buf->sem_perm.__key = vkey(APPSHOT_SEMKEY, arg.buf->sem_perm.__key);
      return r;
  }
  int sid;
  if (!id_arg(APPSHOT_SEMID, id, &sid)) return -1;
  if (cmd == IPC_RMID) {
    struct semid_ds ds;
    key_t skey = REAL(semctl)(sid, 0, IPC_STAT, &ds) == 0 ? ds.sem_perm.__key
                                                          : IPC_PRIVATE;
    r = REAL(semctl)(sid, num, cmd, arg);
    if (r == 0) sem_generation_bump();
    if (r == 0) test_pause("ipc-removed");
    if (r == 0) {
      appshot_ipc_pids_forget(g_h, APPSHOT_SEMID, sid);
      appshot_unmap_system(g_h, APPSHOT_SEMID, sid);
      unbind_removed_key(&SEM, skey);
    }
    return r;
  }
  r = REAL(semctl)(sid, num, cmd, arg);
  if (r == 0 && (cmd == SETVAL || cmd == SETALL)) sem_generation_bump();
  if (r >= 0 && cmd == IPC_STAT)
    arg.buf->sem_perm.__key = vkey(APPSHOT_SEMKEY, arg.buf->sem_perm.__key);
  if (r >= 0 && cmd == GETPID) r = ipc_pid_out(APPSHOT_SEMID, sid, (uint32_t)num, (int32_t)r);
  return r;
}

API int semctl(int id, int num, int cmd, ...) {
  union semun arg = {0};
  switch (cmd) {
    case IPC_STAT: case IPC_SET: case IPC_INFO: case SEM_INFO: case SEM_STAT:
    case SEM_STAT_ANY: case GETALL: case SETALL: case SETVAL: {
      va_list ap;
      va_start(ap, cmd);
      arg = va_arg(ap, union semun);
      va_end(ap);
    }
  }
  return (int)do_semctl(id, num, cmd, arg);
}

/* --- Shared memory ----------------------------------------------------- */

long do_shmat(int id, const void *addr, int flags) {
  ID_WINDOW();
  int sid;
  if (!id_arg(APPSHOT_SHMID, id, &sid)) return -1;
  return (long)REAL(shmat)(sid, addr, flags);
}

API void *shmat(int id, const void *addr, int flags) {
  return (void *)do_shmat(id, addr, flags);
}

static void shm_stat_out(int32_t sid, struct shmid_ds *ds) {
  ds->shm_perm.__key = vkey(APPSHOT_SHMKEY, ds->shm_perm.__key);
  ds->shm_cpid = ipc_pid_out(APPSHOT_SHMID, sid, APPSHOT_IPC_SHM_CPID, ds->shm_cpid);
  ds->shm_lpid = ipc_pid_out(APPSHOT_SHMID, sid, APPSHOT_IPC_SHM_LPID, ds->shm_lpid);
}

long do_shmctl(int id, int cmd, struct shmid_ds *buf) {
  ID_WINDOW();
  ensure_init();
  if (!g_h) return REAL(shmctl)(id, cmd, buf);
  long r;
  switch (cmd) {
    case IPC_INFO:
      return REAL(shmctl)(id, cmd, buf);
    case SHM_INFO: {
      r = REAL(shmctl)(id, cmd, buf);
      struct sysv_usage u;
      if (r >= 0 && sysv_usage(APPSHOT_SHMID, &u)) {
        struct shm_info *info = (struct shm_info *)buf;
        info->used_ids = (int)u.objects;
        info->shm_tot = (unsigned long)u.sum[0];
        info->shm_rss = (unsigned long)u.sum[1];
        info->shm_swp = (unsigned long)u.sum[2];
      }
      return r;
    }
    case SHM_STAT:
    case SHM_STAT_ANY: {
      long sys = REAL(shmctl)(id, cmd, buf);
      r = stat_index_result(APPSHOT_SHMID, sys);
      if (r >= 0) shm_stat_out((int32_t)sys, buf);
      return r;
    }
  }
  int sid;
  if (!id_arg(APPSHOT_SHMID, id, &sid)) return -1;
  if (cmd == IPC_RMID) {
    struct shmid_ds ds;
    key_t skey = REAL(shmctl)(sid, IPC_STAT, &ds) == 0 ? ds.shm_perm.__key
                                                       : IPC_PRIVATE;
    r = REAL(shmctl)(sid, cmd, buf);
    if (r == 0) test_pause("ipc-removed");
    /* The id mapping stays: Linux keeps a removed segment alive, and
     * usable by id, while it is attached. Init drops it once it is gone,
     * and its recorded PIDs with it; gone already, they go here. */
    if (r == 0 && REAL(shmctl)(sid, IPC_STAT, &ds) != 0)
      appshot_ipc_pids_forget(g_h, APPSHOT_SHMID, sid);
    if (r == 0) unbind_removed_key(&SHM, skey);
    return r;
  }
  r = REAL(shmctl)(sid, cmd, buf);
  if (r == 0 && cmd == IPC_STAT) shm_stat_out(sid, buf);
  return r;
}

API int shmctl(int id, int cmd, struct shmid_ds *buf) {
  return (int)do_shmctl(id, cmd, buf);
}

/* --- Message queues ---------------------------------------------------- */

long do_msgsnd(int id, const void *msg, size_t size, int flags) {
  ID_WINDOW();
  int sid;
  if (!id_arg(APPSHOT_MSGID, id, &sid)) return -1;
  return REAL(msgsnd)(sid, msg, size, flags);
}

long do_msgrcv(int id, void *msg, size_t size, long type, int flags) {
  ID_WINDOW();
  int sid;
  if (!id_arg(APPSHOT_MSGID, id, &sid)) return -1;
  return REAL(msgrcv)(sid, msg, size, type, flags);
}

API int msgsnd(int id, const void *msg, size_t size, int flags) {
  return (int)do_msgsnd(id, msg, size, flags);
}

API ssize_t msgrcv(int id, void *msg, size_t size, long type, int flags) {
  return do_msgrcv(id, msg, size, type, flags);
}

static void msg_stat_out(int32_t sid, struct msqid_ds *ds) {
  ds->msg_perm.__key = vkey(APPSHOT_MSGKEY, ds->msg_perm.__key);
  ds->msg_lspid = ipc_pid_out(APPSHOT_MSGID, sid, APPSHOT_IPC_MSG_LSPID, ds->msg_lspid);
  ds->msg_lrpid = ipc_pid_out(APPSHOT_MSGID, sid, APPSHOT_IPC_MSG_LRPID, ds->msg_lrpid);
}

long do_msgctl(int id, int cmd, struct msqid_ds *buf) {
  ID_WINDOW();
  ensure_init();
  if (!g_h) return REAL(msgctl)(id, cmd, buf);
  long r;
  switch (cmd) {
    case IPC_INFO:
      return REAL(msgctl)(id, cmd, buf);
    case MSG_INFO: {
      r = REAL(msgctl)(id, cmd, buf);
      struct sysv_usage u;
      if (r >= 0 && sysv_usage(APPSHOT_MSGID, &u)) {
        struct msginfo *info = (struct msginfo *)buf;
        info->msgpool = (int)u.objects;
        info->msgmap = (int)u.sum[0];
        info->msgtql = (int)u.sum[1];
      }
      return r;
    }
    case MSG_STAT:
    case MSG_STAT_ANY: {
      long sys = REAL(msgctl)(id, cmd, buf);
      r = stat_index_result(APPSHOT_MSGID, sys);
      if (r >= 0) msg_stat_out((int32_t)sys, buf);
      return r;
    }
  }
  int sid;
  if (!id_arg(APPSHOT_MSGID, id, &sid)) return -1;
  if (cmd == IPC_RMID) {
    struct msqid_ds ds;
    key_t skey = REAL(msgctl)(sid, IPC_STAT, &ds) == 0 ? ds.msg_perm.__key
                                                       : IPC_PRIVATE;
    r = REAL(msgctl)(sid, cmd, buf);
    if (r == 0) test_pause("ipc-removed");
    if (r == 0) {
      appshot_ipc_pids_forget(g_h, APPSHOT_MSGID, sid);
      appshot_unmap_system(g_h, APPSHOT_MSGID, sid);
      unbind_removed_key(&MSG, skey);
    }
    return r;
  }
  r = REAL(msgctl)(sid, cmd, buf);
  if (r == 0 && cmd == IPC_STAT) msg_stat_out(sid, buf);
  return r;
}

API int msgctl(int id, int cmd, struct msqid_ds *buf) {
  return (int)do_msgctl(id, cmd, buf);
}

/* --- POSIX message queues: the notifier's PID in a queue's text ----------
 *
 * A read() of a message queue descriptor gives one line (ipc/mqueue.c):
 *   "QSIZE:%-10lu NOTIFY:%-5d SIGNO:%-5d NOTIFY_PID:%-6d\n"
 * whose NOTIFY_PID is the system PID of the process registered with
 * mq_notify. Its fields are left-justified in fixed widths, so the virtual
 * PID is written in the same width (padded with spaces): the text keeps
 * its length, and the offsets a partial read or lseek counts stay true.
 * Descriptors made by mq_open are marked for read() (preload_signal.c),
 * which calls mqueue_translate_read. Not covered: a queue opened by path
 * under a mounted mqueue file system (open("/dev/mqueue/q")), read with
 * pread, readv or stdio's buffered reads of such a path, or by a static
 * program. */
#include <mqueue.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/vfs.h>

#define MQUEUE_MAGIC 0x19800202

static mqd_t mq_opened(const char *name, int oflag, mode_t mode,
                       struct mq_attr *attr) {
  /* glibc's checks and call, made here: the name without its '/'. */
  if (name[0] != '/') return (mqd_t)fail(EINVAL);
  long q = SYS4(mq_open, name + 1, oflag, mode, attr);
  if (q >= 0 && (oflag & O_ACCMODE) != O_WRONLY) translated_reads_mark((int)q, 1);
  return (mqd_t)libc_ret(q);
}

API mqd_t mq_open(const char *name, int oflag, ...) {
  ensure_init();
  mode_t mode = 0;
  struct mq_attr *attr = NULL;
  if (oflag & O_CREAT) {
    va_list ap;
    va_start(ap, oflag);
    mode = va_arg(ap, mode_t);
    attr = va_arg(ap, struct mq_attr *);
    va_end(ap);
  }
  return mq_opened(name, oflag, mode, attr);
}

/* The fortified headers' two-argument form. */
mqd_t __mq_open_2(const char *name, int oflag);
API mqd_t __mq_open_2(const char *name, int oflag) {
  ensure_init();
  if (oflag & O_CREAT) abort(); /* glibc's __fortify_fail: no mode given */
  return mq_opened(name, oflag, 0, NULL);
}

/* --- POSIX message queues: a signal registration's sigev_value ----------
 *
 * A queue's text shows a SIGEV_SIGNAL registration's signal and owner but
 * not its sigev_value, which the handler receives as si_value: noted in
 * the application's tables by the queue's inode, with the registering
 * process (APPSHOT_NOTE_MQ_NOTIFY, appshot_table.h), for a snapshot to
 * carry (src/resources/mqueue.ts). The call is glibc's (SIGEV_THREAD is
 * its helper thread's work). The kernel's registration is its owner's:
 *  - a process registering drops its own earlier note first (one the
 *    kernel ended by notifying), so that a snapshot before the new note is
 *    written finds none and refuses, never the old value; if the call
 *    fails (the queue busy, with this process's registration still there
 *    or someone else's), the note is put back unless the queue has one
 *    now (the other registration's);
 *  - a registration made replaces whatever note the queue had (stale);
 *  - mq_notify(NULL) ends only the caller's own registration: only its own
 *    note goes (another process's call returns 0 and changes nothing). */
API int mq_notify(mqd_t q, const struct sigevent *ev) {
  ensure_init();
  int (*real)(mqd_t, const struct sigevent *) = REAL(mq_notify);
  if (!real) return (int)fail(ENOSYS);
  struct stat st;
  if (!g_h || SYS2(fstat, q, &st) != 0) return real(q, ev);
  const uint64_t ino = (uint64_t)st.st_ino;
  const int32_t me = self_vpid();
  int32_t was_signo = 0, was_owner = 0;
  uint64_t was_value = 0;
  int had = 0;
  if (ev) {
    had = appshot_mq_notify_noted(g_h, ino, &was_signo, &was_value, &was_owner) && was_owner == me;
    appshot_unnote_mq_notify(g_h, ino, me);
  }
  int r = real(q, ev);
  int saved = errno;
  int32_t s_;
  uint64_t v_;
  if (r == 0 && !ev)
    appshot_unnote_mq_notify(g_h, ino, me);
  else if (r == 0 && ev->sigev_notify == SIGEV_SIGNAL)
    appshot_note_mq_notify(g_h, ino, ev->sigev_signo,
                           (uint64_t)(uintptr_t)ev->sigev_value.sival_ptr, me);
  else if (r == 0)
    appshot_unnote_mq_notify(g_h, ino, 0);
  else if (had && !appshot_mq_notify_noted(g_h, ino, &s_, &v_, NULL))
    appshot_note_mq_notify(g_h, ino, was_signo, was_value, me);
  errno = saved;
  return r;
}

void mqueue_translate_read(int fd, char *buf, long n) {
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0 || sf.f_type != MQUEUE_MAGIC) return;
  long end = SYS3(lseek, fd, 0, SEEK_CUR);
  if (end < n) return;
  long off = end - n;
  /* The whole text, to find the field, whichever part was read. */
  char text[128];
  long len = SYS4(pread64, fd, text, sizeof text - 1, 0);
  if (len <= 0) return;
  text[len] = '\0';
  static const char label[] = "NOTIFY_PID:";
  const char *at = strstr(text, label);
  if (!at) return;
  long fs = (at - text) + (long)sizeof label - 1, fe = fs;
  long sys = 0;
  while (fe < len && text[fe] >= '0' && text[fe] <= '9') sys = sys * 10 + (text[fe++] - '0');
  while (fe < len && text[fe] == ' ') fe++; /* the field's padding */
  /* A field wider than the one we write into is not the kernel's format
   * as we know it (at most ~11 bytes): left as the kernel wrote it. */
  if (fe == fs || fe - fs > 24) return;
  /* Outside the application (or nobody: 0): 0, as a PID namespace shows. */
  long virt = sys > 0 && sys <= INT32_MAX ? s2v_or0(APPSHOT_PID, (int32_t)sys) : 0;
  char field[24]; /* fe - fs <= 24, checked above */
  char *e = put_decimal(field, (unsigned long)virt);
  if (e - field > fe - fs) e = put_decimal(field, 0); /* never wider than it was */
  while (e - field < fe - fs) *e++ = ' ';
  /* The part of the field this read returned. */
  for (long i = fs > off ? fs : off; i < fe && i < off + n; i++) buf[i - off] = field[i - fs];
}

/* --- /proc/sysvipc/shm, sem, msg (preload_view.c) ----------------------- */

/* What a line of /proc/sysvipc of object `sid` (a system id of `kind`,
 * APPSHOT_SEMID, _SHMID or _MSGID) shows the application: 0 when the object
 * is not the application's (the line is left out, as SEM_STAT, SHM_STAT
 * and MSG_STAT leave it out); else 1, with its virtual id in *vid, its key
 * in *key as the application made it (given the system's there), and each
 * of the `npids` PIDs in pid[] (given the system's there: shm_cpid and
 * shm_lpid, msg_lspid and msg_lrpid, the APPSHOT_IPC_* fields 0 and 1) as
 * IPC_STAT shows it, the restore's record included. */
int ipc_view_line(enum appshot_kind kind, int32_t sid, int32_t *vid,
                  key_t *key, int32_t *pid, int npids) {
  if (!appshot_s2v(g_h, kind, sid, vid)) return 0;
  enum appshot_kind key_kind = kind == APPSHOT_SEMID   ? APPSHOT_SEMKEY
                               : kind == APPSHOT_SHMID ? APPSHOT_SHMKEY
                                                       : APPSHOT_MSGKEY;
  *key = vkey(key_kind, *key);
  for (int i = 0; i < npids; i++) pid[i] = ipc_pid_out(kind, sid, (uint32_t)i, pid[i]);
  return 1;
}
