/* The per-call cost of the id-carrying calls appshot intercepts. Prints one
 * JSON object of nanoseconds per call. Run it natively and under
 * `appshot run` in the same session and compare (bench/run.js does). */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile long sink;

/* glibc's versioned stat (no header declares it since 2.33). */
int __xstat(int ver, const char *path, struct stat *st);

/* open, one read, close of `path` (a /proc file of a few hundred bytes, as
 * glibc and runtimes read /proc/self/stat): the bytes read. */
static long slurp(const char *path) {
  char buf[4096];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) { perror(path); exit(1); }
  long n = read(fd, buf, sizeof buf);
  close(fd);
  return n;
}

/* The same, relative to the directory `dirfd`. */
static long slurp_at(int dirfd, const char *name) {
  char buf[4096];
  int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
  if (fd < 0) { perror(name); exit(1); }
  long n = read(fd, buf, sizeof buf);
  close(fd);
  return n;
}

/* One listing of `dir` with opendir/readdir/closedir: the entries seen. */
static long list(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) { perror(dir); exit(1); }
  long n = 0;
  while (readdir(d)) n++;
  closedir(d);
  return n;
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

#define TIME(label, n, body)                          \
  do {                                                \
    double t0 = now_ns();                             \
    for (long i = 0; i < (n); i++) { body; }          \
    printf("%s\"%s\":%.2f", first ? "" : ",", label, (now_ns() - t0) / (n)); \
    first = 0;                                        \
  } while (0)

/* MICRO_COW=D (a directory, under a copy-on-write rule in a clone): only
 * the path calls such a rule rewrites, on a file three directories below
 * D, read from the original (nothing private) and on one with a private
 * copy (the first write made it): every call lstats each directory on the
 * way (middle components may be symlinks). A copy-on-write rule applies
 * only in a clone: this prints READY and waits for SIGHUP first, so that
 * bench/cow.js snapshots it waiting and signals each clone. */
static int cow_only(const char *d, long n) {
  sigset_t hup;
  sigemptyset(&hup);
  sigaddset(&hup, SIGHUP);
  sigprocmask(SIG_BLOCK, &hup, NULL);
  printf("READY\n");
  fflush(stdout);
  int sig;
  while (sigwait(&hup, &sig) != 0) {
  }
  char orig[4096], priv[4096];
  snprintf(orig, sizeof orig, "%s/a/b/c/f", d);
  snprintf(priv, sizeof priv, "%s/p/q/r/g", d);
  int fd = open(priv, O_WRONLY | O_APPEND); /* the copy, under a rule */
  if (fd < 0) { perror(priv); return 1; }
  close(fd);
  int first = 1;
  struct stat st;
  printf("{");
  TIME("stat(D/a/b/c/f) original", n / 10, sink += stat(orig, &st));
  TIME("open+close(D/a/b/c/f) original", n / 10, sink += close(open(orig, O_RDONLY | O_CLOEXEC)));
  TIME("stat(D/p/q/r/g) private copy", n / 10, sink += stat(priv, &st));
  TIME("open+close(D/p/q/r/g, O_WRONLY) private copy", n / 10,
       sink += close(open(priv, O_WRONLY | O_CLOEXEC)));
  printf("}\n");
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 2000000;
  long forks = argc > 2 ? atol(argv[2]) : 2000;
  int first = 1;
  if (getenv("MICRO_COW")) return cow_only(getenv("MICRO_COW"), n);
  int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
  if (sem < 0) { perror("semget"); return 1; }
  struct sembuf up = {0, 1, 0}, down = {0, -1, 0};
  pid_t self = getpid();
  printf("{");
  TIME("getpid", n, sink += getpid());
  TIME("getppid", n, sink += getppid());
  TIME("kill(self,0)", n, sink += kill(self, 0));
  struct timespec ts;
  TIME("clock_gettime(MONOTONIC)", n, sink += clock_gettime(CLOCK_MONOTONIC, &ts));
  /* A CPU-time clock of another process (the parent): the translated path. */
  clockid_t parent_clock;
  if (clock_getcpuclockid(getppid(), &parent_clock) != 0) { perror("clock_getcpuclockid"); return 1; }
  TIME("clock_gettime(parent CPU clock)", n / 4, sink += clock_gettime(parent_clock, &ts));
  TIME("semop", n, sink += semop(sem, (i & 1) ? &down : &up, 1));
  TIME("fork+wait", forks, {
    pid_t c = fork();
    if (c == 0) _exit(0);
    int st;
    sink += waitpid(c, &st, 0);
  });
  /* Listings (per listing): a directory of ordinary names, one of
   * numbered names that is not /proc (each stream is classified once),
   * and the two /proc listings that are translated. */
  char numbered[] = "/tmp/appshot-micro-XXXXXX";
  if (!mkdtemp(numbered)) { perror("mkdtemp"); return 1; }
  char path[64];
  for (int i = 1; i <= 1000; i++) {
    snprintf(path, sizeof path, "%s/%d", numbered, i);
    close(open(path, O_CREAT | O_WRONLY, 0600));
  }
  snprintf(path, sizeof path, "%s/a", numbered);
  close(open(path, O_CREAT | O_WRONLY, 0600));
  long lists = n / 10000 > 0 ? n / 10000 : 1;
  /* Files read whole: statm is not translated (what every other /proc
   * file costs), stat and status are (a translated copy at each open). */
  TIME("open+read+close /proc/self/statm", lists * 100, sink += slurp("/proc/self/statm"));
  TIME("open+read+close /proc/self/stat", lists * 100, sink += slurp("/proc/self/stat"));
  TIME("open+read+close /proc/self/status", lists * 100, sink += slurp("/proc/self/status"));
  /* Opens that are not translated, absolute and relative to a directory
   * descriptor (every relative open's name is looked at), and the
   * translated ones relative to a descriptor of /proc/self and /proc. */
  int tmpdirfd = open(numbered, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int selfdirfd = open("/proc/self", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int procdirfd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  char pidstat[32];
  snprintf(pidstat, sizeof pidstat, "%d/stat", (int)self);
  TIME("open+close /dev/null", lists * 100, sink += close(open("/dev/null", O_RDONLY | O_CLOEXEC)));
  TIME("openat(dir, a)+close", lists * 100, sink += close(openat(tmpdirfd, "a", O_RDONLY | O_CLOEXEC)));
  /* stat calls on ordinary paths: absolute, relative to a directory
   * descriptor, and a name starting with a digit relative to the working
   * directory (such names are looked at: under /proc they are PIDs). */
  struct stat st;
  snprintf(path, sizeof path, "%s/a", numbered);
  TIME("fstatat(AT_FDCWD, /tmp/.../a)", n / 10, sink += fstatat(AT_FDCWD, path, &st, 0));
  /* The same through stat, and through __xstat, which a program built
   * against glibc before 2.33 calls for it (a wrapper of its own). */
  TIME("stat(/tmp/.../a)", n / 10, sink += stat(path, &st));
  TIME("__xstat(/tmp/.../a)", n / 10, sink += __xstat(1, path, &st));
  TIME("fstatat(dir, a)", n / 10, sink += fstatat(tmpdirfd, "a", &st, 0));
  TIME("fstatat(dir, 7)", n / 10, sink += fstatat(tmpdirfd, "7", &st, 0));
  if (chdir(numbered) != 0) { perror("chdir"); return 1; }
  TIME("stat(7) in a directory", n / 10, sink += stat("7", &st));
  if (chdir("/") != 0) { perror("chdir /"); return 1; }
  /* Answers that may hold a PID (made virtual under appshot): a link the
   * kernel makes in /proc, /proc/self itself, one outside /proc, and
   * getcwd outside /proc. */
  char link[4096];
  TIME("readlink(/proc/self/exe)", n / 10, sink += readlink("/proc/self/exe", link, sizeof link));
  TIME("readlink(/proc/self)", n / 10, sink += readlink("/proc/self", link, sizeof link));
  snprintf(path, sizeof path, "%s/link", numbered);
  if (symlink("a", path) != 0) { perror("symlink"); return 1; }
  TIME("readlink(/tmp/.../link)", n / 10, sink += readlink(path, link, sizeof link));
  unlink(path);
  TIME("getcwd", n / 10, sink += getcwd(link, sizeof link) != NULL);
  TIME("openat(/proc/self, statm)+read+close", lists * 100, sink += slurp_at(selfdirfd, "statm"));
  TIME("openat(/proc/self, stat)+read+close", lists * 100, sink += slurp_at(selfdirfd, "stat"));
  TIME("openat(/proc, <pid>/stat)+read+close", lists * 100, sink += slurp_at(procdirfd, pidstat));
  close(tmpdirfd);
  close(selfdirfd);
  close(procdirfd);
  TIME("list /usr/bin", lists, sink += list("/usr/bin"));
  TIME("list 1000 numbered files", lists, sink += list(numbered));
  TIME("list /proc/self/task", lists * 10, sink += list("/proc/self/task"));
  TIME("list /proc", lists, sink += list("/proc"));
  for (int i = 1; i <= 1000; i++) {
    snprintf(path, sizeof path, "%s/%d", numbered, i);
    unlink(path);
  }
  snprintf(path, sizeof path, "%s/a", numbered);
  unlink(path);
  rmdir(numbered);
  printf("}\n");
  semctl(sem, 0, IPC_RMID);
  return 0;
}
