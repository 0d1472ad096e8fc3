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
 * the mutex, which finds nothing to mend. Without the library it exits 2. */
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

int main(int argc, char **argv) {
  long n = 20000000;
  if (argc > 1 && !strcmp(argv[1], "moved")) {
    struct {
      int32_t count, capacity;
      struct { int32_t old_tid, new_tid; } move[1];
    } *moves = dlsym(RTLD_DEFAULT, "appshot_tid_moves");
    if (!moves) {
      fprintf(stderr, "mutex: no preload library (appshot_tid_moves)\n");
      return 2;
    }
    moves->move[0].old_tid = 4 * 1024 * 1024;
    moves->move[0].new_tid = getpid();
    __atomic_store_n(&moves->count, 1, __ATOMIC_RELEASE);
  }
  pthread_mutex_t normal = PTHREAD_MUTEX_INITIALIZER, recursive;
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&recursive, &ma);
  pairs_ns(&normal, n / 10); /* warm up */
  printf("{\"normal\":%.2f,", pairs_ns(&normal, n));
  printf("\"recursive\":%.2f}\n", pairs_ns(&recursive, n));
  return 0;
}
