/*
 * Mutex owners mended after a restore.
 *
 * glibc's recursive and error-checking mutexes keep their holder's system
 * TID in __owner and compare it with the calling thread's (cached in its
 * descriptor) on relock and unlock; a priority-inheritance mutex keeps it
 * in its futex word too, which glibc compares on unlock and the kernel
 * reads when another thread contends (FUTEX_LOCK_PI attaches to the task
 * the word names). A restore gives every thread a new TID, so a mutex held
 * across it names a TID no thread has any more: its holder's unlock is
 * refused (EPERM), a recursive relock waits for itself forever, an
 * error-checking one misses EDEADLK, and a PI contender gets ESRCH from
 * the kernel, on which glibc waits forever.
 *
 * Nothing lists such mutexes (robust ones are in their holders' robust
 * lists and mended at restore, src/resources/threads.ts), and searching
 * memory for their shape would be a guess. So they are mended where the
 * program names them: the restore writes the process's moves (each
 * thread's TID at the snapshot, and at the snapshots before it, paired
 * with its TID now) into appshot_tid_moves, and the mutex calls below,
 * while there are moves, look at the mutex they are given before glibc
 * does. Its owner is rewritten only where its kind says glibc keeps a TID
 * there, by the thread the old TID moved to (mend_owner says the one
 * exception), and only where no thread that could hold the mutex has the
 * old TID now (a thread made after the restore, or another process's,
 * may have been given it back: then the owner may be that thread, and is
 * left alone).
 *
 * Hot path: one load of the count, which is 0 unless this process was
 * restored with TIDs that changed, then glibc's function. Nothing
 * allocated, no lock, a system call only when a mutex's owner is an old
 * TID that moved to the caller (signal 0: has a thread it now?): safe wherever
 * glibc's own calls are. glibc's internal callers do not come through
 * here, except that the condition waits' unlock and relock of their mutex
 * are mended around the wait by our condition waits below (glibc's current
 * versions only; the GLIBC_2.2.5 compatibility ones are glibc's alone): see
 * the README's list of what is not kept ("Mutexes that are not robust,
 * held across a restore"). A fork child forgets the moves.
 */
#include "preload.h"

#include <dlfcn.h>
#include <linux/futex.h>

/* Written by the restore (src/resources/mutexes.ts), which holds to this
 * layout and capacity: the restore finds the table by its symbol in the
 * library it maps, never where an image says. */
#define TID_MOVES_MAX 256
struct appshot_tid_moves {
  int32_t count; /* moves in use; 0: nothing to mend (the hot path's test) */
  int32_t capacity;
  /* Where glibc keeps a thread's system TID, from its thread pointer
   * (what it compares __owner with); 0: not known, asked of the kernel. */
  int32_t glibc_tid_offset;
  int32_t reserved;
  struct {
    int32_t old_tid, new_tid;
  } move[TID_MOVES_MAX];
};
static struct appshot_tid_moves g_tid_moves = {0, TID_MOVES_MAX, 0, 0, {{0, 0}}};
extern struct appshot_tid_moves appshot_tid_moves
    __attribute__((alias("g_tid_moves"), visibility("default")));

/* glibc's functions by their second public names, so that ours, which
 * take the first, never find themselves, and need no dlsym nor init
 * (other libraries' constructors lock mutexes before ours runs). glibc
 * exports those names at version GLIBC_2.2.5 only. timedlock and
 * clocklock have no second name: found by dlsym at init (REAL_FUNCS). */
extern int appshot_real_mutex_lock(pthread_mutex_t *m);
extern int appshot_real_mutex_trylock(pthread_mutex_t *m);
extern int appshot_real_mutex_unlock(pthread_mutex_t *m);
__asm__(".symver appshot_real_mutex_lock, __pthread_mutex_lock@GLIBC_2.2.5");
__asm__(".symver appshot_real_mutex_trylock, __pthread_mutex_trylock@GLIBC_2.2.5");
__asm__(".symver appshot_real_mutex_unlock, __pthread_mutex_unlock@GLIBC_2.2.5");

/* __kind (x86-64 struct __pthread_mutex_s: __lock, __count, __owner,
 * __nusers, __kind): the type in the low two bits, and flag bits. */
#define KIND_TYPE_MASK 3
#define KIND_RECURSIVE 1
#define KIND_ERRORCHECK 2
#define KIND_ROBUST 16
#define KIND_PI 32
#define KIND_PSHARED 128

/* The calling thread's system TID as glibc has it (the restore rewrote
 * it there): one load from the thread's own descriptor where the restore
 * said where, else a system call. */
static inline __attribute__((always_inline)) int32_t own_tid(void) {
  long off = __atomic_load_n(&g_tid_moves.glibc_tid_offset, __ATOMIC_RELAXED);
  if (LIKELY(off >= 16 && off < 4096 && !(off & 3))) {
    int32_t tid;
    __asm__("movl %%fs:(%1), %0" : "=r"(tid) : "r"(off));
    return tid;
  }
  return (int32_t)SYS0(gettid);
}

/* Whether no thread that could hold the mutex has TID `tid` now (signal
 * 0): of this process for a private mutex (one made after the restore may
 * have been given an old TID back), of any process for a process-shared
 * one (another process sharing it may have been given it). Apart: the
 * scan below stays a leaf. */
static __attribute__((noinline)) int no_holder_has(int32_t tid, int pshared) {
  long r = pshared ? appshot_raw_syscall(SYS_tkill, tid, 0, 0, 0, 0, 0)
                   : appshot_raw_syscall(SYS_tgkill, SYS0(getpid), tid, 0, 0, 0, 0);
  return r == -ESRCH;
}

/* The new TID of a thread of this process whose old TID was `old`; 0 if
 * none. */
static int32_t moved_tid(int32_t old) {
  int32_t n = __atomic_load_n(&g_tid_moves.count, __ATOMIC_ACQUIRE);
  if (n > TID_MOVES_MAX) n = TID_MOVES_MAX;
  for (int32_t i = 0; i < n; i++)
    if (g_tid_moves.move[i].old_tid == old) {
      int32_t now = g_tid_moves.move[i].new_tid;
      return now > 0 ? now : 0;
    }
  return 0;
}

/* The owner fields glibc compares of the mutex `m` the program passed
 * (its __kind `kind`), given their holder's new TID where they hold an old
 * one. Only the holder compares __owner, so only the holder rewrites it:
 * the caller, where the old TID moved to it. Another thread that finds an
 * old TID there (a contender, or a thread given that TID back) leaves it
 * to the holder's next call. The one exception is a private PI mutex's
 * futex word, which the kernel reads when a contender waits: that
 * contender mends it, where no thread of this process has the old TID
 * (then none can hold the mutex under it). A compare and swap: another
 * thread may lock, unlock or mend it at the same time, and only the exact
 * old value is replaced. errno is not touched (raw system calls only). */
static __attribute__((noinline)) void mend_owner(pthread_mutex_t *m, int kind, int32_t self) {
  struct __pthread_mutex_s *d = &m->__data;
  int pshared = !!(kind & KIND_PSHARED);
  /* Compared by recursive and error-checking ones (PI and
   * priority-protect ones too), and set by every PI lock. */
  int owner = __atomic_load_n(&d->__owner, __ATOMIC_RELAXED);
  if (owner > 0 && owner != self && moved_tid(owner) == self && no_holder_has(owner, pshared))
    __atomic_compare_exchange_n(&d->__owner, &owner, self, 0, __ATOMIC_RELAXED,
                                __ATOMIC_RELAXED);
  if (kind & KIND_PI) {
    /* The futex word: the holder's TID and the kernel's waiters and
     * owner-died bits, which stay. */
    int word = __atomic_load_n(&d->__lock, __ATOMIC_RELAXED);
    int32_t tid = word & FUTEX_TID_MASK, now;
    if (!tid || tid == self || !(now = moved_tid(tid))) return;
    if ((pshared && now != self) || !no_holder_has(tid, pshared)) return;
    /* Again while the TID is still the old one: a waiter's FUTEX_LOCK_PI
     * (restarted by the restore) may set FUTEX_WAITERS in between, and a
     * word left with the old TID would have glibc's unlock refused. */
    while (!__atomic_compare_exchange_n(&d->__lock, &word, (word & ~FUTEX_TID_MASK) | now,
                                        0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      if ((word & FUTEX_TID_MASK) != tid) break;
  }
}

/* Only while there are moves, and only kinds whose owner fields glibc
 * compares: recursive, error-checking or PI, not robust (those are
 * mended through the robust lists at restore). A normal mutex costs a
 * restored process a second load; one its caller holds under its TID now
 * (mended, or locked since), a third and a fourth. */
static inline __attribute__((always_inline)) void mend(pthread_mutex_t *m) {
  if (LIKELY(!__atomic_load_n(&g_tid_moves.count, __ATOMIC_RELAXED)) || !m) return;
  int kind = __atomic_load_n(&m->__data.__kind, __ATOMIC_RELAXED);
  int type = kind & KIND_TYPE_MASK;
  if ((kind & KIND_ROBUST) ||
      (!(kind & KIND_PI) && type != KIND_RECURSIVE && type != KIND_ERRORCHECK))
    return;
  int owner = __atomic_load_n(&m->__data.__owner, __ATOMIC_RELAXED);
  /* Free, or the caller's under its TID now: nothing to mend. */
  if (owner == 0 &&
      !((kind & KIND_PI) && (__atomic_load_n(&m->__data.__lock, __ATOMIC_RELAXED) & FUTEX_TID_MASK)))
    return;
  int32_t self = own_tid();
  if (owner == self) return;
  mend_owner(m, kind, self);
}

/* A fork child's one thread is none of the threads the moves name: a
 * mutex held by another of the parent's threads is held by no thread of
 * the child's, mended or not, and one the forking thread held keeps the
 * parent's TID, as glibc leaves it in any fork. Written only if set, so
 * that a fork does not copy the page for nothing. */
void tid_moves_forget(void) {
  if (__atomic_load_n(&g_tid_moves.count, __ATOMIC_RELAXED))
    __atomic_store_n(&g_tid_moves.count, 0, __ATOMIC_RELAXED);
}

API int pthread_mutex_lock(pthread_mutex_t *m) {
  mend(m);
  return appshot_real_mutex_lock(m);
}

API int pthread_mutex_trylock(pthread_mutex_t *m) {
  mend(m);
  return appshot_real_mutex_trylock(m);
}

API int pthread_mutex_unlock(pthread_mutex_t *m) {
  mend(m);
  return appshot_real_mutex_unlock(m);
}

/* glibc's function at `index` (REAL_FUNCS), as init resolved it. Null
 * before that, in a call made on init's own thread while init resolves
 * them (another library's code run by dlsym), or where glibc has none
 * (pthread_cond_clockwait before 2.30): then asked for now, and if glibc
 * has none, the caller fails with ENOSYS rather than jump to 0. */
static void *real_or_lookup(int index, const char *name, const char *version) {
  void *f = __atomic_load_n(&real_fn[index], __ATOMIC_RELAXED);
  if (LIKELY(f != NULL)) return f;
  if (version) f = dlvsym(RTLD_NEXT, name, version);
  return f ? f : dlsym(RTLD_NEXT, name);
}
#define REAL_OR_LOOKUP(n, version) \
  ((__typeof__(&n))real_or_lookup(R_##n, #n, version))

API int pthread_mutex_timedlock(pthread_mutex_t *m, const struct timespec *t) {
  ensure_init();
  int (*real)(pthread_mutex_t *, const struct timespec *) =
      REAL_OR_LOOKUP(pthread_mutex_timedlock, NULL);
  if (UNLIKELY(!real)) return ENOSYS;
  mend(m);
  return real(m, t);
}

API int pthread_mutex_clocklock(pthread_mutex_t *m, clockid_t c,
                                const struct timespec *t) {
  ensure_init();
  int (*real)(pthread_mutex_t *, clockid_t, const struct timespec *) =
      REAL_OR_LOOKUP(pthread_mutex_clocklock, NULL);
  if (UNLIKELY(!real)) return ENOSYS;
  mend(m);
  return real(m, c, t);
}

/* Around glibc's wait: its mutex mended before (held across a restore)
 * and after (a restore during the wait), and noted in the thread's state
 * meanwhile for the restore (a nested wait, from a signal handler, puts
 * the outer one's note back). */
static inline uint64_t cond_wait_begins(pthread_mutex_t *m) {
  mend(m);
  uint64_t outer = t_timed_wait.cond_mutex;
  t_timed_wait.cond_mutex = (uint64_t)(uintptr_t)m;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  return outer;
}

static inline void cond_wait_ends(pthread_mutex_t *m, uint64_t outer) {
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  t_timed_wait.cond_mutex = outer;
  mend(m);
}

/* Condition waits give their mutex up and take it again inside glibc
 * (__pthread_mutex_unlock_usercnt, __pthread_mutex_cond_lock), past the
 * calls above. Mended before: a mutex held across a restore and then
 * waited with names its holder's old TID, and glibc's unlock inside the
 * wait compares it (EPERM at once, the mutex still held: a program's
 * `while (!ready) pthread_cond_wait(...)` would spin). Mended after: a
 * restore may come while the thread waits, and glibc's relock of a PI
 * mutex sets __owner from the TID it read before its FUTEX_LOCK_PI (the
 * old one, if a snapshot caught it there); the next condition wait would
 * compare that. The hot path is mend's one load of the count on each
 * side (a restore may set it during the wait), and ensure_init's.
 *
 * These three carry glibc's current versions (GLIBC_2.3.2, and 2.34 for
 * clockwait: addon/preload/preload.map), which is what programs linked
 * since glibc 2.3.2 name, and what dlsym's unversioned lookups take. A
 * program bound to the compatibility versions (GLIBC_2.2.5, another
 * layout of pthread_cond_t) passes them by to glibc's own: its waits are
 * not mended (test/fixtures/condcompat.c). Each notes its mutex in the
 * thread's t_timed_wait.cond_mutex while glibc waits, for the restore
 * (src/resources/threads.ts restorePiWaitWords). */
API int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m) {
  ensure_init();
  int (*real)(pthread_cond_t *, pthread_mutex_t *) =
      REAL_OR_LOOKUP(pthread_cond_wait, "GLIBC_2.3.2");
  if (UNLIKELY(!real)) return ENOSYS;
  uint64_t outer = cond_wait_begins(m);
  int r = real(c, m);
  cond_wait_ends(m, outer);
  return r;
}

API int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m,
                               const struct timespec *t) {
  ensure_init();
  int (*real)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *) =
      REAL_OR_LOOKUP(pthread_cond_timedwait, "GLIBC_2.3.2");
  if (UNLIKELY(!real)) return ENOSYS;
  uint64_t outer = cond_wait_begins(m);
  int r = real(c, m, t);
  cond_wait_ends(m, outer);
  return r;
}

/* pthread_cond_clockwait@GLIBC_2.30, libpthread's before glibc 2.34 moved
 * it into libc, is the same function under its first version: programs
 * linked against 2.30-2.33 reach the same wait. */
API SYMVER("pthread_cond_clockwait@@GLIBC_2.34") SYMVER("pthread_cond_clockwait@GLIBC_2.30")
int appshot_current_pthread_cond_clockwait(pthread_cond_t *c, pthread_mutex_t *m,
                                           clockid_t clock, const struct timespec *t) {
  ensure_init();
  int (*real)(pthread_cond_t *, pthread_mutex_t *, clockid_t,
              const struct timespec *) =
      REAL_OR_LOOKUP(pthread_cond_clockwait, "GLIBC_2.34");
  if (UNLIKELY(!real)) return ENOSYS;
  uint64_t outer = cond_wait_begins(m);
  int r = real(c, m, clock, t);
  cond_wait_ends(m, outer);
  return r;
}
