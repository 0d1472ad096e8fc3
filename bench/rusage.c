/* Runs a command and prints, on stderr after its own output, the wall time
 * and CPU time (user + system, of it and every descendant it waited for)
 * it took, in microseconds: "RUSAGE wall_us cpu_us". The shell's `times`
 * counts in clock ticks (10 ms), too coarse for a command of a few ms.
 *
 *   rusage COMMAND [ARG...]     exits with the command's status
 */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long us(struct timeval t) { return t.tv_sec * 1000000LL + t.tv_usec; }

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: rusage COMMAND [ARG...]\n");
    return 2;
  }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pid_t pid = fork();
  if (pid < 0) return perror("fork"), 127;
  if (!pid) {
    execvp(argv[1], argv + 1);
    perror(argv[1]);
    _exit(127);
  }
  int status;
  struct rusage ru;
  if (wait4(pid, &status, 0, &ru) < 0) return perror("wait4"), 127;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  long long wall = (t1.tv_sec - t0.tv_sec) * 1000000LL + (t1.tv_nsec - t0.tv_nsec) / 1000;
  fprintf(stderr, "RUSAGE %lld %lld\n", wall, us(ru.ru_utime) + us(ru.ru_stime));
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
