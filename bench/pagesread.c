/* The page writer's reading path (pw_dump into a page file), timed on a
 * stopped child of MIB MiB, for comparing builds of pages.c.
 *
 *   pagesread DIR MIB LAYOUT ROUNDS
 *
 * LAYOUT says which pages the child wrote after it was forked (the rest
 * stay shared copy-on-write with this process, as a forking server's
 * worker's do): "all" (every page its own), "alt" (every other page: runs
 * of one page, exclusive and shared by turns), "runK" (K written, K not). One JSON line per round: wall and CPU milliseconds of the pw_dump
 * of the whole mapping, with the pages it wrote. The last round's page
 * file is read back and every page compared with what the child holds:
 * "bad" counts those that differ (exit 1 if any). Build:
 *   cc -O2 -D_GNU_SOURCE -I../addon/src -o bin/pagesread pagesread.c \
 *      ../addon/src/pages.c -lcrypto -lpthread
 * (pages.c from any commit, for an A/B). */
#include "pages.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static double cpu_ms(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e3 + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e3;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: pagesread DIR MIB all|alt|runK ROUNDS\n");
    return 2;
  }
  size_t size = (size_t)atol(argv[2]) << 20;
  const char* layout = argv[3];
  int rounds = atoi(argv[4]);
  size_t run = strcmp(layout, "alt") == 0 ? 1 : strncmp(layout, "run", 3) == 0 ? (size_t)atol(layout + 3) : 0;
  size_t every = run ? 2 * run : 1;
  if (!run) run = 1;
  char* mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return perror("mmap"), 1;
  madvise(mem, size, MADV_NOHUGEPAGE);
  for (size_t i = 0; i < size; i += 4096) memset(mem + i, (int)(i >> 12) | 1, 64);
  pid_t child = fork();
  if (child == 0) {
    for (size_t p = 0; p < size / 4096; p++)
      if (p % every < run) mem[p * 4096 + 100] = 7;
    raise(SIGSTOP);
    _exit(0);
  }
  int st;
  waitpid(child, &st, WUNTRACED);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", child);
  int pm = open(path, O_RDONLY);
  if (pm < 0) return perror(path), 1;
  for (int r = 0; r < rounds; r++) {
    page_writer w;
    int rc = pw_open(&w, argv[1], 0, 0);
    if (rc) return fprintf(stderr, "pw_open: %s\n", strerror(-rc)), 1;
    pages_result out;
    double t0 = now_ms(), c0 = cpu_ms();
    rc = pw_dump(&w, child, pm, (uint64_t)(uintptr_t)mem, (uint64_t)(uintptr_t)mem + size, PAGES_ANON,
                 NULL, NULL, &out);
    double t1 = now_ms(), c1 = cpu_ms();
    if (rc) return fprintf(stderr, "pw_dump: %s\n", strerror(-rc)), 1;
    printf("{\"layout\":\"%s\",\"wallMs\":%.1f,\"cpuMs\":%.1f,\"pages\":%llu}\n", layout, t1 - t0, c1 - c0,
           (unsigned long long)out.pages_written);
    free(out.runs);
    free(out.same);
    free(out.shared);
    if (r < rounds - 1) {
      pw_abort(&w);
      continue;
    }
    /* Every page is stored (none is zeros), in order, from the start. */
    char file[4200];
    snprintf(file, sizeof file, "%s/pagesread.%d", argv[1], (int)getpid());
    if ((rc = pw_finish(&w)) || (rc = pw_link(&w, file)))
      return fprintf(stderr, "pw_finish: %s\n", strerror(-rc)), 1;
    pw_abort(&w);
    int fd = open(file, O_RDONLY);
    unlink(file);
    size_t bad = out.pages_written == size / 4096 ? 0 : size / 4096;
    static char page[4096];
    for (size_t p = 0; fd >= 0 && !bad && p < size / 4096; p++) {
      memcpy(page, mem + p * 4096, 4096);
      if (p % every < run) page[100] = 7;
      char got[4096];
      if (pread(fd, got, sizeof got, (off_t)(out.data_offset + p * 4096)) != (ssize_t)sizeof got ||
          memcmp(got, page, sizeof got))
        bad++;
    }
    if (fd >= 0) close(fd);
    printf("{\"layout\":\"%s\",\"bad\":%zu}\n", layout, fd < 0 ? size / 4096 : bad);
    if (fd < 0 || bad) return 1;
  }
  kill(child, SIGKILL);
  waitpid(child, &st, 0);
  return 0;
}
