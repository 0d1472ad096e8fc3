/* The application of bench/objects.js: many kernel objects and little else.
 *
 *   objapp N M DIR
 *
 * Listens on 127.0.0.1 (a port the kernel picks) and makes N TCP
 * connections to itself, keeping both ends: 2N established sockets in one
 * process. Takes M POSIX record locks (fcntl F_SETLK) on DIR/objapp-locks,
 * one byte each at bytes 0, 2, 4... (a byte apart, so that the kernel does
 * not merge neighbours into one lock), write and read in turn. Prints
 * "READY port=P" once all are made.
 *
 * SIGUSR1: checks them all and prints "VERIFIED n" (the n-th check) or
 * "FAIL: ..." and exits 1. Every connection carries a message each way
 * (client to server and back, naming the connection, so that two swapped
 * connections would show); a forked checker (a process cannot see its own
 * locks through F_GETLK) finds every lock with its type, range and holder,
 * and a sample of the bytes between free.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("FAIL: ");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  exit(1);
}

static volatile sig_atomic_t asked;
static void on_usr1(int s) { (void)s; asked = 1; }

static int n_conns, n_locks;
static int *client, *server;
static int lockfd;
static char lockpath[4096];

static void exchange(int from, int to, int i, const char *dir) {
  char want[32], got[32];
  int len = snprintf(want, sizeof want, "%s %d\n", dir, i);
  if (write(from, want, (size_t)len) != len) fail("connection %d: write %s: %s", i, dir, strerror(errno));
  int have = 0;
  while (have < len) {
    ssize_t r = read(to, got + have, (size_t)(len - have));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) fail("connection %d: read %s: %s", i, dir, r ? strerror(errno) : "end of stream");
    have += (int)r;
  }
  if (memcmp(want, got, (size_t)len)) fail("connection %d: sent %.*s, got %.*s", i, len - 1, want, len - 1, got);
}

/* In a forked child: every lock seen from outside. */
static void check_locks(pid_t holder) {
  int fd = open(lockpath, O_RDWR);
  if (fd < 0) fail("open %s: %s", lockpath, strerror(errno));
  for (int i = 0; i < n_locks; i++) {
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 2 * i, .l_len = 1};
    if (fcntl(fd, F_GETLK, &l)) fail("F_GETLK at %d: %s", 2 * i, strerror(errno));
    short want = i % 2 ? F_RDLCK : F_WRLCK;
    if (l.l_type != want || l.l_start != 2 * i || l.l_len != 1 || l.l_pid != holder)
      fail("lock %d: type %d at %lld+%lld by %d, not type %d at %d+1 by %d", i, l.l_type, (long long)l.l_start, (long long)l.l_len, l.l_pid, want, 2 * i,
           holder);
    if (i % 97) continue;
    struct flock gap = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 2 * i + 1, .l_len = 1};
    if (fcntl(fd, F_GETLK, &gap) || gap.l_type != F_UNLCK) fail("byte %d, between locks, is locked", 2 * i + 1);
  }
  exit(0);
}

static void verify(unsigned n) {
  for (int i = 0; i < n_conns; i++) {
    exchange(client[i], server[i], i, "up");
    exchange(server[i], client[i], i, "down");
  }
  pid_t me = getpid(), checker = fork();
  if (checker < 0) fail("fork: %s", strerror(errno));
  if (!checker) check_locks(me);
  int st;
  while (waitpid(checker, &st, 0) < 0)
    if (errno != EINTR) fail("waitpid: %s", strerror(errno));
  if (!WIFEXITED(st) || WEXITSTATUS(st)) exit(1); /* the checker said why */
  printf("VERIFIED %u\n", n);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc != 4) {
    fprintf(stderr, "usage: objapp CONNECTIONS LOCKS DIR\n");
    return 2;
  }
  n_conns = atoi(argv[1]);
  n_locks = atoi(argv[2]);
  struct rlimit nofile;
  getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);
  if ((rlim_t)(2 * n_conns + 16) > nofile.rlim_cur) fail("%d connections need %d descriptors; the limit is %llu", n_conns, 2 * n_conns + 16, (unsigned long long)nofile.rlim_cur);

  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof a;
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 128) || getsockname(l, (struct sockaddr *)&a, &alen)) fail("listen: %s", strerror(errno));
  client = calloc((size_t)n_conns + 1, sizeof *client);
  server = calloc((size_t)n_conns + 1, sizeof *server);
  for (int i = 0; i < n_conns; i++) {
    client[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (client[i] < 0 || connect(client[i], (struct sockaddr *)&a, sizeof a)) fail("connect %d: %s", i, strerror(errno));
    server[i] = accept(l, NULL, NULL);
    if (server[i] < 0) fail("accept %d: %s", i, strerror(errno));
  }

  snprintf(lockpath, sizeof lockpath, "%s/objapp-locks", argv[3]);
  lockfd = open(lockpath, O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (lockfd < 0 || ftruncate(lockfd, 2 * (off_t)n_locks)) fail("%s: %s", lockpath, strerror(errno));
  for (int i = 0; i < n_locks; i++) {
    struct flock lk = {.l_type = i % 2 ? F_RDLCK : F_WRLCK, .l_whence = SEEK_SET, .l_start = 2 * i, .l_len = 1};
    if (fcntl(lockfd, F_SETLK, &lk)) fail("lock %d: %s", i, strerror(errno));
  }

  struct sigaction sa = {.sa_handler = on_usr1};
  sigaction(SIGUSR1, &sa, NULL);
  printf("READY port=%d\n", ntohs(a.sin_port));
  /* The bench asks once the previous answer is out, so the signal never
   * falls between the test and pause(). */
  for (unsigned n = 1;; n++) {
    while (!asked) pause();
    asked = 0;
    verify(n);
  }
}
