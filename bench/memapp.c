/* The benchmarks' application: MIB MiB of touched private memory.
 *
 *   memapp MIB
 *
 * Prints "READY" once its memory is touched. SIGUSR1: rewrites 1% of its
 * pages, prints "DIRTIED n". SIGUSR2: forks 7 times and prints
 * "FORK <median µs>", the time from fork() to the child running, the
 * baseline a restore is compared with.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t dirty, forks;
static void on_usr1(int s) { (void)s; dirty = 1; }
static void on_usr2(int s) { (void)s; forks = 1; }

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  size_t size = (size_t)(argc > 1 ? atol(argv[1]) : 16) << 20;
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGUSR1, on_usr1);
  signal(SIGUSR2, on_usr2);
  char* mem = malloc(size);
  for (size_t i = 0; i < size; i += 4096) memset(mem + i, (int)(i >> 12) | 1, 64);
  printf("READY\n");
  for (;;) {
    pause();
    if (dirty) {
      dirty = 0;
      size_t n = 0;
      for (size_t p = 0; p < size / 4096; p += 100, n++) mem[p * 4096 + 100]++;
      printf("DIRTIED %zu\n", n);
    }
    if (forks) {
      forks = 0;
      double t[7];
      for (int k = 0; k < 7; k++) {
        int fd[2];
        if (pipe(fd)) return 1;
        double t0 = now_us();
        pid_t pid = fork();
        if (pid == 0) {
          if (write(fd[1], "x", 1) != 1) _exit(1);
          _exit(0);
        }
        char c;
        if (read(fd[0], &c, 1) != 1) return 1;
        t[k] = now_us() - t0;
        waitpid(pid, NULL, 0);
        close(fd[0]);
        close(fd[1]);
      }
      qsort(t, 7, sizeof t[0], cmp);
      printf("FORK %.1f\n", t[3]);
    }
  }
}
