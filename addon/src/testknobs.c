#define _GNU_SOURCE
#include "testknobs.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

/* Test knobs (pages.c's check's, APPSHOT_TEST_MNT_ID in
 * addon_fsident.cc) weaken a check or choose its source; they are
 * honoured only in a process started with APPSHOT_TEST_KNOBS=1 in its own
 * environment: the resident engine sets each command's APPSHOT_*
 * variables in its own environment while it serves that command
 * (src/engine/server.ts), where anything else it runs meanwhile (a hosted
 * serve's check, another client's restore) would read them (review r372,
 * finding 2). One gate for all, so the rule cannot drift between them
 * (r392 F11). /proc/self/environ is the block the process
 * was started with, which a later setenv does not change. No /proc, or
 * any failure: off. */
static int test_knobs_on;
static pthread_once_t test_knobs_once = PTHREAD_ONCE_INIT;

static void find_test_knobs(void) {
  static const char want[] = "APPSHOT_TEST_KNOBS=1";
  int fd = open("/proc/self/environ", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[4096];
  /* How much of `want` the current entry matched so far; -1: it cannot. */
  int at = 0;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (ssize_t i = 0; i < n; i++) {
      if (buf[i] == 0) {
        if (at == (int)sizeof want - 1) test_knobs_on = 1;
        at = 0;
      } else if (at >= 0) {
        at = at < (int)sizeof want - 1 && want[at] == buf[i] ? at + 1 : -1;
      }
    }
  }
  close(fd);
}

const char* appshot_test_knob(const char* name) {
  pthread_once(&test_knobs_once, find_test_knobs);
  return test_knobs_on ? getenv(name) : NULL;
}
