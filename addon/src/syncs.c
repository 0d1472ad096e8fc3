#define _GNU_SOURCE
#include "syncs.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void run(struct fsync_job* j) {
  uint64_t t0 = now_ns();
  j->rc = fsync(j->fd) ? -errno : 0;
  j->ns = now_ns() - t0;
}

static void* job_main(void* arg) {
  run(arg);
  return NULL;
}

void fsync_job_start(struct fsync_job* j, int fd) {
  memset(j, 0, sizeof *j);
  j->fd = fd;
  if (pthread_create(&j->thread, NULL, job_main, j) == 0) j->running = 1;
  else run(j);
}

int fsync_job_wait(struct fsync_job* j) {
  if (j->running) pthread_join(j->thread, NULL);
  j->running = 0;
  j->waited = 1;
  return j->rc;
}
