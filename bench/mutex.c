/* The cost of the preload library's mutex wrappers (preload_mutex.c):
 * uncontended pthread_mutex_lock+unlock pairs, in nanoseconds per pair,
 * of a normal and a recursive mutex. Prints one JSON object. Run it
 * natively and under `appshot run` in the same session and compare
 * (bench/mutex.js does).
 *
 * With the argument "moved", under the preload library, it first makes
 * the library's TID moves non-empty, as a restore that changed the TIDs
 * does (one move, of a TID no thread can have: PID_MAX_LIMIT), to time
 * what every call costs in a restored process: the slow path's look at
 * the mutex, which finds nothing to mend. With "full", the table holds
 * all 256 moves the library takes (none of them this thread's), the most
 * a look can scan. Either also tells the library where glibc keeps the
 * thread's TID, as the restore does: the offset given as the next
 * argument, which "tid-offset", run without the library, prints (under
 * `appshot run` gettid answers the virtual TID, not the one glibc keeps).
 * Without the library it exits 2.
 *
 * "recursive_held" times relock+unlock pairs of a recursive mutex the
 * thread holds: each call finds the mutex owned by its caller. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* Each pair through a pointer the compiler cannot see through: the
 * calls are made as a program makes them, through the PLT. */
static int (*volatile lock_fn)(pthread_mutex_t *) = pthread_mutex_lock;
static int (*volatile unlock_fn)(pthread_mutex_t *) = pthread_mutex_unlock;

static double pairs_ns(pthread_mutex_t *m, long n) {
  int (*lock)(pthread_mutex_t *) = lock_fn, (*unlock)(pthread_mutex_t *) = unlock_fn;
  double t0 = now_ns();
  for (long i = 0; i < n; i++) {
    lock(m);
    unlock(m);
  }
  return (now_ns() - t0) / n;
}

/* Where glibc keeps this thread's TID in its descriptor (the thread
 * pointer, which pthread_self is on x86-64), as the snapshot finds it. */
static int32_t glibc_tid_offset(void) {
  const int32_t *self = (const int32_t *)pthread_self();
  int32_t tid = gettid();
  for (int32_t off = 16; off < 4096; off += 4)
    if (self[off / 4] == tid) return off;
  return 0;
}

/* Header words of struct appshot_tid_moves (count, capacity, glibc's TID
 * offset, reserved). */
#ifndef TID_MOVES_HEADER_WORDS
#define TID_MOVES_HEADER_WORDS 4
#endif

int main(int argc, char **argv) {
  long n = 20000000;
  if (argc > 1 && !strcmp(argv[1], "tid-offset")) {
    printf("%d\n", glibc_tid_offset());
    return 0;
  }
  int moves_n = argc > 1 && !strcmp(argv[1], "moved") ? 1 : argc > 1 && !strcmp(argv[1], "full") ? 256 : 0;
  if (moves_n) {
    int32_t *table = dlsym(RTLD_DEFAULT, "appshot_tid_moves");
    if (!table) {
      fprintf(stderr, "mutex: no preload library (appshot_tid_moves)\n");
      return 2;
    }
    if (TID_MOVES_HEADER_WORDS > 2) table[2] = argc > 2 ? atoi(argv[2]) : glibc_tid_offset();
    int32_t *move = table + TID_MOVES_HEADER_WORDS;
    for (int i = 0; i < moves_n; i++) {
      move[2 * i] = 4 * 1024 * 1024 - i;
      move[2 * i + 1] = getpid();
    }
    __atomic_store_n(&table[0], moves_n, __ATOMIC_RELEASE);
  }
  pthread_mutex_t normal = PTHREAD_MUTEX_INITIALIZER, recursive, held;
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&recursive, &ma);
  pthread_mutex_init(&held, &ma);
  pthread_mutex_lock(&held);
  pairs_ns(&normal, n / 10); /* warm up */
  printf("{\"normal\":%.2f,", pairs_ns(&normal, n));
  printf("\"recursive\":%.2f,", pairs_ns(&recursive, n));
  printf("\"recursive_held\":%.2f}\n", pairs_ns(&held, n));
  return 0;
}
