/*
 * Identity: glibc's random number generators reseeded in a clone.
 *
 * A clone starts from a copy of its template's memory, so a generator the
 * application seeded once at start (srandom(time() ^ getpid()), as servers
 * do) would draw the same numbers in every clone. Libraries that reseed on
 * fork notice a changed getpid(); a clone keeps its virtual PID, so that
 * never fires. The instance section of the tables carries an identity,
 * 128 random bits new in every clone and kept by a plain restore
 * (appshot_table.h, struct appshot_identity); this file compares it with
 * the one the process's memory last saw and, when they differ, reseeds.
 *
 * Why here, in the wrappers, and not from outside at clone time: glibc's
 * state (`unsafe_state`, `randtbl`, `__libc_drand48_data`) has no exported
 * symbol and Debian strips libc's .symtab, so appshot cannot find it in the
 * image; and the restore can inject system calls but not a call of
 * srandom(). Inside the process, srandom() and seed48() are at hand, take
 * glibc's own lock, and work whichever state initstate() installed. The
 * check costs the wrapped calls two loads and a compare; the reseed runs
 * once per process per clone, on its first draw.
 *
 * What is covered: random(), rand() (glibc's rand() calls its random()
 * internally, so both are wrapped) and drand48(), lrand48(), mrand48().
 * Not covered: random_r(), rand_r(), erand48() & co. keep their state in
 * the caller's memory, where no one but the application knows it; glibc's
 * internal callers of its own random() (none that matters for secrecy).
 *
 * By default (APPSHOT_RESEED_SEEDED) a generator is reseeded only if this
 * process seeded it itself: one left at its default seed is deterministic
 * by specification (POSIX: as if srandom(1)), and a program may count on
 * that. A seed the process chooses after the clone is its own and is kept.
 *
 * Nothing here allocates; the reseed takes glibc's generator lock, as the
 * wrapped calls do anyway (they are not async-signal-safe in glibc either).
 */
#include "preload.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <sys/random.h>

/* The identity (id[0]) of the instance this process's memory belongs to,
 * as last seen: set at start (a process started in an instance belongs to
 * it), after a reseed, and by the process's own seeding. */
static uint64_t g_identity_seen;
/* Whether the process seeded each generator itself. */
static int g_random_seeded, g_rand48_seeded;

/* The real functions, resolved at load (our constructor) or on first use
 * if another library's constructor draws before ours ran. */
#define IDENTITY_FUNCS(X)                                                  \
  X(random) X(rand) X(srandom) X(srand) X(initstate) X(setstate)          \
  X(drand48) X(lrand48) X(mrand48) X(srand48) X(seed48) X(lcong48)

enum {
#define X(n) I_##n,
  IDENTITY_FUNCS(X)
#undef X
  I_COUNT
};
static void *g_real[I_COUNT];
static const char *const g_names[I_COUNT] = {
#define X(n) #n,
    IDENTITY_FUNCS(X)
#undef X
};

static void *real_slow(int i) {
  void *f = dlsym(RTLD_NEXT, g_names[i]);
  __atomic_store_n(&g_real[i], f, __ATOMIC_RELEASE);
  return f;
}
static inline void *real(int i) {
  void *f = __atomic_load_n(&g_real[i], __ATOMIC_ACQUIRE);
  return LIKELY(f) ? f : real_slow(i);
}
#define REAL_ID(n) ((__typeof__(&n))real(I_##n))

/* The identity of the instance the process runs in now; 0 outside appshot
 * and for an application `appshot run` started. */
static inline uint64_t current_identity(void) {
  const struct appshot_header *h = g_h;
  return h ? __atomic_load_n(&h->instance.identity.id[0], __ATOMIC_RELAXED) : 0;
}

/* Fresh seed bytes from the kernel; should getrandom fail, the identity
 * itself (random, new in each clone) and the time still make them differ. */
static void seed_bytes(void *buf, size_t n, uint64_t identity) {
  if (appshot_raw_syscall(SYS_getrandom, (long)buf, (long)n, GRND_NONBLOCK, 0, 0, 0) == (long)n) return;
  struct timespec t;
  appshot_raw_syscall(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&t, 0, 0, 0, 0);
  uint64_t mix = identity ^ ((uint64_t)t.tv_nsec << 20) ^ (uint64_t)t.tv_sec ^ (uint64_t)SYS0(gettid);
  memcpy(buf, &mix, n < sizeof mix ? n : sizeof mix);
}

/* The process finds itself in another instance than its memory's. */
static NOINLINE void identity_changed(uint64_t now) {
  const struct appshot_header *h = g_h;
  uint32_t policy = h ? h->instance.identity.reseed_libc : APPSHOT_RESEED_NEVER;
  if (policy == APPSHOT_RESEED_ALWAYS || (policy == APPSHOT_RESEED_SEEDED && g_random_seeded)) {
    unsigned seed;
    seed_bytes(&seed, sizeof seed, now);
    REAL_ID(srandom)(seed);
  }
  if (policy == APPSHOT_RESEED_ALWAYS || (policy == APPSHOT_RESEED_SEEDED && g_rand48_seeded)) {
    unsigned short seed[3];
    seed_bytes(seed, sizeof seed, now);
    REAL_ID(seed48)(seed);
  }
  /* Two threads may both get here: each reseeds, which is harmless. A
   * thread that sees the new value sees the reseeded state (release). */
  __atomic_store_n(&g_identity_seen, now, __ATOMIC_RELEASE);
}

/* On every draw: reseed first if the instance changed. */
static inline void check_identity(void) {
  uint64_t now = current_identity();
  if (UNLIKELY(now != __atomic_load_n(&g_identity_seen, __ATOMIC_ACQUIRE))) identity_changed(now);
}

/* The process seeds a generator itself: its seed is kept in this instance,
 * and `template create` learns that clones would share it. */
static void seeded_by_process(int *which) {
  *which = 1;
  __atomic_store_n(&g_identity_seen, current_identity(), __ATOMIC_RELAXED);
  struct appshot_header *h = g_h;
  if (h && !__atomic_load_n(&h->instance.identity.libc_seeded, __ATOMIC_RELAXED))
    __atomic_store_n(&h->instance.identity.libc_seeded, 1, __ATOMIC_RELAXED);
}

API long random(void) {
  check_identity();
  return REAL_ID(random)();
}
API int rand(void) {
  check_identity();
  return REAL_ID(rand)();
}
API void srandom(unsigned seed) {
  seeded_by_process(&g_random_seeded);
  REAL_ID(srandom)(seed);
}
/* glibc's srand is an alias of srandom, but a program may name either. */
API void srand(unsigned seed) {
  seeded_by_process(&g_random_seeded);
  REAL_ID(srand)(seed);
}
API char *initstate(unsigned seed, char *state, size_t n) {
  seeded_by_process(&g_random_seeded);
  return REAL_ID(initstate)(seed, state, n);
}
API char *setstate(char *state) {
  seeded_by_process(&g_random_seeded);
  return REAL_ID(setstate)(state);
}
API double drand48(void) {
  check_identity();
  return REAL_ID(drand48)();
}
API long lrand48(void) {
  check_identity();
  return REAL_ID(lrand48)();
}
API long mrand48(void) {
  check_identity();
  return REAL_ID(mrand48)();
}
API void srand48(long seed) {
  seeded_by_process(&g_rand48_seeded);
  REAL_ID(srand48)(seed);
}
API unsigned short *seed48(unsigned short seed[3]) {
  seeded_by_process(&g_rand48_seeded);
  return REAL_ID(seed48)(seed);
}
API void lcong48(unsigned short param[7]) {
  seeded_by_process(&g_rand48_seeded);
  REAL_ID(lcong48)(param);
}

/* A process started in an instance belongs to it: it has nothing to
 * reseed until it is cloned. Resolving here keeps dlsym off the draws. */
__attribute__((constructor)) static void identity_ctor(void) {
  ensure_init();
  for (int i = 0; i < I_COUNT; i++)
    if (!__atomic_load_n(&g_real[i], __ATOMIC_ACQUIRE)) real_slow(i);
  __atomic_store_n(&g_identity_seen, current_identity(), __ATOMIC_RELAXED);
}
