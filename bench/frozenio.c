/* Ways of copying a stopped process's memory into a page file, timed as
 * the frozen window would be (issue 14): what the page writer does inside
 * it, and what is left for after it (fsync).
 *
 *   frozenio DIR MIB METHOD...
 *
 * A child touches MIB MiB (as bench/memapp does) and is stopped; each
 * METHOD then copies all of it into a fresh O_TMPFILE in DIR, and one JSON
 * line per METHOD says how long the copy took (copyMs: the frozen part),
 * the fsync after it (fsyncMs), of the copy the reads and the writes
 * apart (readMs, writeMs), and the /proc/vmstat counters that moved
 * (machine-wide: page faults, page allocations). Methods:
 *   mapped     fallocate + MAP_SHARED + MADV_POPULATE_WRITE per 1 MiB
 *              window + pread(/proc/PID/mem) into the window (pages.c
 *              since 62ecc4a)
 *   buffered   a warm 8 MiB buffer (touched before the timing), pread of
 *              /proc/PID/mem into it, then write() of it to the file
 *   bufcold    the same with a fresh 8 MiB buffer per round, as the
 *              writer thread's queue gets them (aligned_alloc)
 *   vmreadv    process_vm_readv into the warm buffer, then write()
 *   direct     buffered, but the file opened O_DIRECT: no page cache, the
 *              writes go to the disk from the buffer as they are made
 *   splice     pread into the warm buffer, vmsplice it into a pipe, splice
 *              the pipe to the file (what CRIU's page transfer does, the
 *              parasite's vmsplice replaced by our copy)
 * Prefix a method with "pre:" to fallocate the whole file first, or with
 * "pw:" to write zeros over all of it first, untimed but shown apart
 * (prewriteMs): what pw_reserve does before the freeze. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define BUF (8u << 20)
#define WIN (1u << 20)

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char* what) {
  perror(what);
  exit(1);
}

static const char* counters[] = {"pgfault", "pgalloc_normal", "pgfree", "thp_fault_alloc", "nr_dirtied", "nr_written", "pgactivate"};
#define NC (sizeof counters / sizeof *counters)

static void vmstat(long long* out) {
  FILE* f = fopen("/proc/vmstat", "r");
  char name[64];
  long long v;
  for (size_t i = 0; i < NC; i++) out[i] = 0;
  while (f && fscanf(f, "%63s %lld", name, &v) == 2)
    for (size_t i = 0; i < NC; i++)
      if (!strcmp(name, counters[i])) out[i] = v;
  if (f) fclose(f);
}

static void pread_all(int fd, void* dst, size_t len, uint64_t at) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(fd, (char*)dst + done, len - done, (off_t)(at + done));
    if (r <= 0) die("pread mem");
    done += (size_t)r;
  }
}

static void write_all(int fd, const void* p, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, (const char*)p + done, len - done);
    if (n < 0) die("write");
    done += (size_t)n;
  }
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: frozenio DIR MIB METHOD...\n");
    return 2;
  }
  size_t size = (size_t)atol(argv[2]) << 20;
  int ready[2];
  if (pipe(ready)) die("pipe");
  char** addrp = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  pid_t child = fork();
  if (child == 0) {
    char* mem = malloc(size);
    for (size_t i = 0; i < size; i += 4096) memset(mem + i, (int)(i >> 12) | 1, 64);
    *addrp = mem;
    if (write(ready[1], "x", 1) != 1) _exit(1);
    for (;;) pause();
  }
  char c;
  if (read(ready[0], &c, 1) != 1) die("child");
  kill(child, SIGSTOP);
  uint64_t base = (uint64_t)(uintptr_t)*addrp;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", child);
  int mem = open(path, O_RDONLY);
  if (mem < 0) die(path);
  uint8_t* warm = aligned_alloc(4096, BUF);
  memset(warm, 1, BUF);
  for (int m = 3; m < argc; m++) {
    const char* method = argv[m];
    int pre = !strncmp(method, "pre:", 4);
    if (pre) method += 4;
    int prewrite = !strncmp(method, "pw:", 3);
    if (prewrite) method += 3;
    int direct = !strcmp(method, "direct");
    int fd = open(argv[1], O_RDWR | O_TMPFILE | (direct ? O_DIRECT : 0), 0600);
    if (fd < 0) die(direct ? "O_TMPFILE|O_DIRECT (not on tmpfs)" : "O_TMPFILE");
    if (pre && fallocate(fd, 0, 0, (off_t)size)) die("fallocate");
    /* pw: the page cache made beforehand, by writing zeros from the warm
     * buffer (what the frozen window then only overwrites). */
    double pw0 = now_ms();
    if (prewrite) {
      memset(warm, 0, BUF);
      for (size_t at = 0; at < size; at += BUF) write_all(fd, warm, size - at < BUF ? size - at : BUF);
      if (lseek(fd, 0, SEEK_SET)) die("lseek");
    }
    double prewrite_ms = now_ms() - pw0;
    long long before[NC], after[NC];
    vmstat(before);
    double read_ms = 0, write_ms = 0;
    double t0 = now_ms();
    if (!strcmp(method, "mapped")) {
      uint8_t* map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (map == MAP_FAILED) die("mmap");
      for (size_t at = 0; at < size; at += WIN) {
        if (!pre && fallocate(fd, 0, (off_t)at, WIN)) die("fallocate");
        if (madvise(map + at, WIN, MADV_POPULATE_WRITE)) die("populate");
        double a = now_ms();
        pread_all(mem, map + at, WIN, base + at);
        read_ms += now_ms() - a;
      }
      munmap(map, size);
    } else if (!strcmp(method, "buffered") || !strcmp(method, "bufcold") || direct) {
      int cold = !strcmp(method, "bufcold");
      for (size_t at = 0; at < size; at += BUF) {
        size_t n = size - at < BUF ? size - at : BUF;
        uint8_t* b = cold ? aligned_alloc(4096, BUF) : warm;
        double a = now_ms();
        pread_all(mem, b, n, base + at);
        double b1 = now_ms();
        write_all(fd, b, n);
        read_ms += b1 - a;
        write_ms += now_ms() - b1;
        if (cold) free(b);
      }
    } else if (!strcmp(method, "vmreadv")) {
      for (size_t at = 0; at < size; at += BUF) {
        size_t n = size - at < BUF ? size - at : BUF;
        struct iovec l = {warm, n}, r = {(void*)(uintptr_t)(base + at), n};
        double a = now_ms();
        if (process_vm_readv(child, &l, 1, &r, 1, 0) != (ssize_t)n) die("process_vm_readv");
        double b1 = now_ms();
        write_all(fd, warm, n);
        read_ms += b1 - a;
        write_ms += now_ms() - b1;
      }
    } else if (!strcmp(method, "splice")) {
      int p[2];
      if (pipe(p)) die("pipe");
      int cap = fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
      if (cap < 0) die("F_SETPIPE_SZ");
      for (size_t at = 0; at < size; at += BUF) {
        size_t n = size - at < BUF ? size - at : BUF;
        double a = now_ms();
        pread_all(mem, warm, n, base + at);
        read_ms += now_ms() - a;
        for (size_t off = 0; off < n;) {
          size_t k = n - off < (size_t)cap ? n - off : (size_t)cap;
          struct iovec v = {warm + off, k};
          ssize_t in = vmsplice(p[1], &v, 1, 0);
          if (in <= 0) die("vmsplice");
          for (ssize_t moved = 0; moved < in;) {
            ssize_t s = splice(p[0], NULL, fd, NULL, (size_t)(in - moved), SPLICE_F_MOVE);
            if (s <= 0) die("splice");
            moved += s;
          }
          off += (size_t)in;
        }
      }
      close(p[0]);
      close(p[1]);
    } else {
      fprintf(stderr, "frozenio: unknown method %s\n", method);
      return 2;
    }
    double t1 = now_ms();
    if (fsync(fd)) die("fsync");
    double t2 = now_ms();
    vmstat(after);
    printf("{\"method\":\"%s%s\",\"mib\":%zu,\"copyMs\":%.1f,\"fsyncMs\":%.1f,\"readMs\":%.1f,\"writeMs\":%.1f,\"prewriteMs\":%.1f", pre ? "pre:" : prewrite ? "pw:" : "", method,
           size >> 20, t1 - t0, t2 - t1, read_ms, write_ms, prewrite_ms);
    for (size_t i = 0; i < NC; i++) printf(",\"%s\":%lld", counters[i], after[i] - before[i]);
    printf("}\n");
    close(fd);
  }
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);
  return 0;
}
