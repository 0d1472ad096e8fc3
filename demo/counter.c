/* The demo's application: counts, and says which process it is. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (unsigned long n = 1;; n++) {
    printf("count %lu (pid %d as the app sees it)\n", n, getpid());
    struct timespec ts = {0, 200 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
