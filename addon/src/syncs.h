/* fsync on a thread of its own: started now, waited for later, so that
 * syncs that depend on nothing of each other run at once (the image
 * commit's: see commitImageDir in src/image/format.ts, pw_finish in
 * pages.c). Plain C; the addon wraps it. */
#ifndef APPSHOT_SYNCS_H
#define APPSHOT_SYNCS_H

#include <pthread.h>
#include <stdint.h>

struct fsync_job {
  pthread_t thread;
  int fd;
  int running; /* a thread was started: fsync_job_wait joins it */
  int waited;  /* fsync_job_wait returned (rc and ns are final) */
  int rc;      /* 0 or -errno */
  uint64_t ns; /* how long the fsync itself took */
};

/* Starts fsync(fd). Where no thread can be made, it runs here, at once
 * (slower, not wrong). */
void fsync_job_start(struct fsync_job* j, int fd);
/* Waits for it: 0 or -errno (again the same on a second call). */
int fsync_job_wait(struct fsync_job* j);

#endif
