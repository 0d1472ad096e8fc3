/* The baseline of bench/clone-thousand.js, and the program it clones.
 *
 *   forkmany N      forks N children of this (small) process, each of
 *                   which says it runs (one byte on a pipe) and waits;
 *                   once all N have said so, kills them all (SIGKILL) and
 *                   reaps them. Prints {"forkMs":..,"killMs":..}: from the
 *                   first fork() to the Nth child running, and from the
 *                   first kill() to the Nth child reaped.
 *   forkmany idle   the template's program: prints READY, then waits
 *                   (what a clone of it runs is this same process image).
 *
 * A child runs nothing but the write and pause(): the same work a clone of
 * `forkmany idle` does once it runs (it is already past its READY).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char** argv) {
  if (argc == 2 && strcmp(argv[1], "idle") == 0) {
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    for (;;) pause();
  }
  long n = argc == 2 ? strtol(argv[1], NULL, 10) : 0;
  if (n < 1 || n > 100000) {
    fprintf(stderr, "usage: forkmany N (1..100000) | forkmany idle\n");
    return 2;
  }
  pid_t* kids = calloc((size_t)n, sizeof *kids);
  int ready[2];
  if (!kids || pipe(ready) != 0) {
    perror("forkmany");
    return 1;
  }
  double start = now_ms();
  for (long i = 0; i < n; i++) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      for (long j = 0; j < i; j++) kill(kids[j], SIGKILL);
      while (wait(NULL) > 0 || errno == EINTR) {}
      return 1;
    }
    if (pid == 0) {
      close(ready[0]);
      if (write(ready[1], "r", 1) != 1) _exit(1);
      for (;;) pause();
    }
    kids[i] = pid;
  }
  close(ready[1]);
  char buf[256];
  long seen = 0;
  while (seen < n) {
    ssize_t got = read(ready[0], buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    seen += got;
  }
  double running = now_ms();
  double killing = now_ms();
  for (long i = 0; i < n; i++) kill(kids[i], SIGKILL);
  long reaped = 0;
  while (reaped < n) {
    if (wait(NULL) > 0) reaped++;
    else if (errno != EINTR) break;
  }
  double gone = now_ms();
  if (seen < n || reaped < n) {
    fprintf(stderr, "forkmany: %ld of %ld children ran, %ld reaped\n", seen, n, reaped);
    return 1;
  }
  printf("{\"forkMs\":%.3f,\"killMs\":%.3f}\n", running - start, gone - killing);
  return 0;
}
