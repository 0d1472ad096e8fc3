/*
 * appshot-init: the supervisor of one application, its virtual PID 1.
 *
 *   appshot-init --tables PATH --state-dir DIR --preload LIB --aid A
 *                [--status-fd N] -- cmd args...
 *   appshot-init ... --seeds N      (for `appshot restore`)
 *                [--timens MONOTONIC_NS,BOOTTIME_NS]
 *   appshot-init --standby 1 --preload LIB --status-fd N --seeds N
 *                --lifeline FD      (a standby, see below)
 *
 * Why a separate C process rather than the Node CLI:
 *  - It is a child subreaper, so every process that daemonizes (double
 *    fork, setsid) is reparented here and stays inside the application, and
 *    it sees getppid() == 1 exactly as under a container's init.
 *  - It must outlive `appshot run` when the first process exits but daemons
 *    remain, and a resident Node process would cost ~40 MB per application.
 *  - Knowing when the last process of the application is gone is simple
 *    here: waitpid(-1) answers ECHILD only when no descendant is left.
 *
 * It reports to the CLI over --status-fd, one line per event:
 *   "S <vpid> <pid>"   the command was exec'd
 *   "E <errno>"        the command could not be exec'd
 *   "X <code>"         the first process ended (exit code, or 128 + signal)
 *   "R <image>"        (before the last "X") a snapshot to <image> ended it
 *   "C <pid> <addr>"   a seed was forked (--seeds); addr, if not 0: where
 *                      it has a scratch area of its own (see seed_scratch)
 *
 * With --seeds N it runs no command: it forks N seeds, children that wait
 * in pause() for the restore driver to seize them and turn each into a
 * process of the image. Restored processes are thus init's children, as
 * the image's were, and init supervises them as any application's.
 *
 * A standby (--standby 1, kept by the resident engine ahead of time, see
 * src/restore/standby.ts) forks its seeds and reports them at once, then
 * waits for the rest of its arguments on the lifeline: the fields tables,
 * state dir, AID, commit path and log path, each ended by a NUL, then an
 * empty one. Given them, it takes its log as stdout and stderr and goes on
 * as a supervisor started with them would. If the lifeline ends first
 * (the engine let it go, or died however it died), it kills its seeds and
 * exits, having touched nothing. Its seeds die with it too (a parent-death
 * signal, cleared by the restore that takes them), so that nothing of a
 * standby outlives the engine, whatever is killed first.
 *
 * A restore is all or nothing, even if the driver is killed (kill -9) at
 * any instant. The driver holds the write end of --lifeline FD and creates
 * the file --commit PATH once every process is made (for a batch of
 * clones, once every instance is: one file for all). When the lifeline
 * ends (the driver closed it or died) and PATH does not exist, the restore
 * never committed: init kills every process of the application, seeds
 * included, removes its SysV objects and tables, and leaves the registry
 * directory for the next appshot command to release with what the driver
 * recorded there (private copies, directories it made).
 *
 * When the last process ends it removes what the kernel holds for the
 * application: its SysV objects and its translation tables. The registry
 * directory stays, with the file "exit" ("CODE MILLISECONDS\n": the exit
 * code of virtual PID 2, 128 + N if killed by signal N, and the time it
 * ended), so that `appshot ps -a`, `logs` and `wait` still see the ended
 * application until `appshot rm` or `prune` removes it, as docker keeps an
 * exited container. Two exceptions remove the directory as well, leaving
 * the AID free at once: a snapshot ended the application (the snapshot
 * driver wrote the file "released", holding the image's path, which is
 * reported as "R <path>" before "X"), or the command could not be exec'd.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "appshot_table.h"
#include "appshot_used.h"

/* How often stale entries are swept out of the tables. The kernel hands out
 * PIDs cyclically, so a dead process's PID is not reused for a long while;
 * this only bounds how long a dead id stays visible in `appshot table`. */
#define SWEEP_SECONDS 2

static struct appshot_header *tables;
/* The descriptor `tables` was mapped from, kept (close-on-exec) for the
 * walks that must see every entry: lseek(SEEK_DATA) on it says which pages
 * hold entries, and only those are read through the mapping, where a read
 * of every slot allocated the file's holes (appshot_used.h). Our own, not
 * the one the application's processes share: nothing of theirs can put
 * another file at its number. */
static int tables_fd = -1;
static const char *tables_path, *state_dir, *preload_lib, *aid;
static int status_fd = -1;
/* The restore driver's lifeline and commit file (see above); -1 / NULL
 * once the restore is committed, or for `appshot run`. */
static int lifeline_fd = -1;
static const char *commit_path;
/* --timens: the clock offsets of the time namespace the seeds are forked
 * into (src/resources/timens.ts), or NULL for ours. */
static const char *time_offsets;
#define MAX_SEEDS 4096
/* Seeds not reaped yet (0 once reaped: the PID may be anyone's since). */
static pid_t seed_pids[MAX_SEEDS];
static int seed_count;
/* The salt is taken from the tables before any process of the application
 * runs, the time they were made from the registration (app.json, in the
 * registry's own directory): the file is writable by every process of the
 * application afterwards, whatever its uid, so what it says then is never
 * trusted for what we do as our own user (see "Privileged readers" in
 * appshot_table.h). */
static uint64_t trusted_salt;
static int64_t trusted_created;
/* The process that started us, as it was then: the restore driver (or
 * the engine whose standby we were), which makes the application's
 * private segments itself. Read first thing, while it is our parent:
 * killed, it may be a zombie nobody has reaped while we clean up, no
 * longer our parent (see the rule in appshot_table.c). */
static struct appshot_process_id starter;

/* "tablesCreated": N from the registration's app.json, or -1. */
static int64_t registered_created(void) {
  static char buf[1 << 20];
  char path[4096];
  snprintf(path, sizeof path, "%s/app.json", state_dir);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  size_t n = 0;
  ssize_t r;
  while (n < sizeof buf - 1 && (r = read(fd, buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)r;
  close(fd);
  buf[n] = 0;
  const char *p = strstr(buf, "\"tablesCreated\":");
  if (!p) return -1;
  p += strlen("\"tablesCreated\":");
  while (*p == ' ') p++;
  if (*p < '0' || *p > '9') return -1;
  return strtoll(p, NULL, 10);
}

static void die(const char *what) {
  fprintf(stderr, "appshot-init: %s: %s\n", what, strerror(errno));
  /* Seeds already forked would wait in pause() for ever, their signals
   * blocked: nothing but us knows them. */
  for (int k = 0; k < seed_count; k++)
    if (seed_pids[k] > 1) kill(seed_pids[k], SIGKILL);
  exit(125);
}

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

/* "S NS" of an offset in nanoseconds, as timens_offsets takes it: the
 * nanoseconds within 0..999999999, the seconds signed. */
static void offset_text(char *buf, size_t cap, const char *clock, long long ns) {
  long long s = ns / 1000000000LL, rest = ns % 1000000000LL;
  if (rest < 0) {
    rest += 1000000000LL;
    s--;
  }
  snprintf(buf, cap, "%s %lld %lld\n", clock, s, rest);
}

/* A time namespace with the offsets `spec` ("MONOTONIC_NS,BOOTTIME_NS")
 * for our children from here on: unshared, its offsets written before any
 * process is in it (the kernel refuses them after). Not for us: init's
 * own clocks do not matter. Needs CAP_SYS_ADMIN (the driver checked). */
static void unshare_time_namespace(const char *spec) {
  char *end;
  long long mono = strtoll(spec, &end, 10);
  if (*end != ',') {
    errno = EINVAL;
    die("--timens");
  }
  long long boot = strtoll(end + 1, &end, 10);
  if (*end) {
    errno = EINVAL;
    die("--timens");
  }
  if (unshare(CLONE_NEWTIME) != 0) die("making a time namespace (unshare CLONE_NEWTIME)");
  char text[128];
  offset_text(text, sizeof text, "monotonic", mono);
  size_t len = strlen(text);
  offset_text(text + len, sizeof text - len, "boottime", boot);
  int fd = open("/proc/self/timens_offsets", O_WRONLY | O_CLOEXEC);
  if (fd < 0) die("/proc/self/timens_offsets");
  ssize_t n = write(fd, text, strlen(text));
  if (n != (ssize_t)strlen(text)) die("writing the time namespace's offsets");
  close(fd);
}

static void report(const char *fmt, long a, long b) {
  if (status_fd < 0) return;
  char line[64];
  int n = snprintf(line, sizeof line, fmt, a, b);
  if (write(status_fd, line, (size_t)n) < 0) {
    /* The CLI went away (detached run, or it was killed): stop reporting. */
    close(status_fd);
    status_fd = -1;
  }
}

static int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 125;
}

/* The environment of the application: ours plus the variables that make
 * the preload library translate through this application's tables. */
static void set_app_env(void) {
  const char *old = getenv("LD_PRELOAD");
  if (old && *old) {
    size_t n = strlen(preload_lib) + strlen(old) + 2;
    char *both = malloc(n);
    if (!both) die("malloc");
    snprintf(both, n, "%s %s", preload_lib, old);
    setenv("LD_PRELOAD", both, 1);
  } else {
    setenv("LD_PRELOAD", preload_lib, 1);
  }
  setenv("APPSHOT_TABLES", tables_path, 1);
  setenv("APPSHOT_AID", aid, 1);
  /* The descriptor the first process keeps and hands on (see
   * addon/preload/preload_fd.c): a command that changes user before its
   * first dynamically linked program runs (a static wrapper, a script whose
   * interpreter drops privileges) still reaches the tables. Without it the
   * preload library opens them by path, as it can as this user. */
  int fd = open(tables_path, O_RDWR | O_CLOEXEC);
  int kept = fd >= 0 ? fcntl(fd, F_DUPFD, appshot_tables_fd_base()) : -1;
  if (fd >= 0) close(fd);
  if (kept >= 0) {
    char number[16];
    snprintf(number, sizeof number, "%d", kept);
    setenv("APPSHOT_TABLES_FD", number, 1);
  } else {
    unsetenv("APPSHOT_TABLES_FD");
  }
}

/* Forks and execs the command; returns its PID, or -errno if exec failed. */
static pid_t launch(char **argv, const sigset_t *orig_mask) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) die("pipe");
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    close(pipefd[0]);
    if (status_fd >= 0) close(status_fd);
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, orig_mask, NULL);
    set_app_env();
    execvp(argv[0], argv);
    int err = errno;
    if (write(pipefd[1], &err, sizeof err) < 0) _exit(127);
    _exit(err == ENOENT ? 127 : 126);
  }
  close(pipefd[1]);
  /* Bind it now, not only when its preload library starts: a static binary
   * or a shell script's interpreter must be in the table as well. */
  appshot_map_system(tables, APPSHOT_PID, pid, 0, 0);
  int err = 0;
  ssize_t n;
  do n = read(pipefd[0], &err, sizeof err);
  while (n < 0 && errno == EINTR);
  close(pipefd[0]);
  if (n == (ssize_t)sizeof err) {
    waitpid(pid, NULL, 0);
    appshot_unmap_system(tables, APPSHOT_PID, pid);
    return -err;
  }
  return pid;
}

/* A seed: a process that does nothing until the restore driver takes it
 * over with ptrace. Its signals stay blocked: it must not die of one
 * before its own dispositions and mask are restored. */
/* glibc's per-thread rseq registration (2.35+; absent, weak and 0). */
extern const ptrdiff_t __rseq_offset __attribute__((weak));
extern const unsigned int __rseq_size __attribute__((weak));

/* A seed gives up its rseq area itself: the restore would otherwise spend
 * an injected call on it (restore/driver.ts looks, and still does it if
 * this could not). The length must be the one registered: glibc's
 * __rseq_size, or the original 32 bytes of struct rseq. Returns whether
 * no rseq area is registered any more. */
static int drop_rseq(void) {
  if (&__rseq_size == NULL || &__rseq_offset == NULL || __rseq_size == 0) return 1;
  char *tp;
  __asm__("mov %%fs:0, %0" : "=r"(tp));
  const unsigned lengths[] = {__rseq_size, 32};
  for (size_t k = 0; k < sizeof lengths / sizeof lengths[0]; k++)
    if (syscall(SYS_rseq, tp + __rseq_offset, lengths[k], 1 /* RSEQ_FLAG_UNREGISTER */, 0x53053053 /* RSEQ_SIG */) == 0) return 1;
  return 0;
}

/* The scratch area every seed starts with, mapped here before the seeds
 * are forked (each inherits its own copy at the same address) and
 * unmapped here after: the restore driver runs its batches of system
 * calls from it (src/ptrace/remote.ts, whose size it is), if no mapping
 * of the image is in its way, instead of spending a stop of each seed
 * on mapping one. Executable, for the batch code the driver writes in;
 * 0 where that is refused (memory-deny-write-execute): the driver maps
 * its own then. */
#define SEED_SCRATCH_SIZE (1ul << 18)
static unsigned long seed_scratch_at;

static void map_seed_scratch(void) {
  void *at = mmap(NULL, SEED_SCRATCH_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  seed_scratch_at = at == MAP_FAILED ? 0 : (unsigned long)at;
}

static void unmap_seed_scratch(void) {
  if (seed_scratch_at) munmap((void *)seed_scratch_at, SEED_SCRATCH_SIZE);
  seed_scratch_at = 0;
}

/* A standby's seed gives up its memory (the copy of appshot-init it was
 * forked as) before it waits: all but the scratch area and the kernel's
 * vDSO, its data pages and the vsyscall page, which is what the restore
 * driver unmaps first (src/resources/memory.ts restoreMemory). Done here,
 * while the standby waits for a restore, it is not done in the first stop
 * the restore spends on the seed (about half a millisecond of its time).
 * The seed then runs from code written into the scratch area, which needs
 * nothing else, not even a stack: one munmap per mapping, then pause()
 * for ever. The driver overwrites that code with its batch code once the
 * seed is stopped and its own; the seed never runs it again. Where
 * anything is unexpected (no scratch area, more mappings than the buffer
 * holds, another architecture), the seed keeps its memory and waits as
 * any other seed does. */
static void empty_standby_seed(void) {
#if defined(__x86_64__)
  if (!seed_scratch_at) return;
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  static char maps[16384];
  size_t n = 0;
  ssize_t got = 0;
  while (n < sizeof maps - 1 && (got = read(fd, maps + n, sizeof maps - 1 - n)) > 0) n += (size_t)got;
  close(fd);
  /* Full, or cut short: not all of it was read. */
  if (n == 0 || n >= sizeof maps - 1 || got < 0) return;
  maps[n] = 0;
  unsigned char *code = (unsigned char *)seed_scratch_at, *at = code;
  /* Each munmap takes 27 bytes of code; the area is far larger. */
  const unsigned char *limit = code + SEED_SCRATCH_SIZE - 64;
  for (char *line = maps; *line; ) {
    char *next = strchr(line, '\n');
    if (next) *next = 0;
    char *end;
    unsigned long start = strtoul(line, &end, 16), stop = *end == '-' ? strtoul(end + 1, &end, 16) : 0;
    if (!stop || stop <= start) return;
    int kept = (start <= seed_scratch_at && seed_scratch_at < stop) || strstr(line, "[vdso]") || strstr(line, "[vvar]") ||
               strstr(line, "[vvar_vclock]") || strstr(line, "[vsyscall]");
    if (!kept) {
      if (at + 27 > limit) return;
      unsigned long length = stop - start;
      unsigned int nr = SYS_munmap;
      *at++ = 0x48, *at++ = 0xbf, memcpy(at, &start, 8), at += 8;  /* mov rdi, start */
      *at++ = 0x48, *at++ = 0xbe, memcpy(at, &length, 8), at += 8; /* mov rsi, length */
      *at++ = 0xb8, memcpy(at, &nr, 4), at += 4;                    /* mov eax, SYS_munmap */
      *at++ = 0x0f, *at++ = 0x05;                                   /* syscall */
    }
    if (!next) break;
    line = next + 1;
  }
  unsigned int nr = SYS_pause;
  *at++ = 0xb8, memcpy(at, &nr, 4), at += 4; /* again: mov eax, SYS_pause */
  *at++ = 0x0f, *at++ = 0x05;                /* syscall */
  *at++ = 0xeb, *at++ = 0xf7;                /* jmp again */
  __builtin___clear_cache((char *)code, (char *)at);
  ((void (*)(void))(void *)code)();
#endif
}

static pid_t fork_seed(int standby) {
  pid_t init = getpid();
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    if (status_fd >= 0) close(status_fd);
    if (lifeline_fd >= 0) close(lifeline_fd);
    /* A standby's seed may wait long: it must not outlive us. */
    if (standby && (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != init)) _exit(1);
    /* Emptied only without an rseq area: the kernel writes to it (in
     * the TLS it would unmap) at the next preemption, and the seed would
     * die of SIGSEGV at the restore's first call (review24). */
    if (drop_rseq() && standby) empty_standby_seed();
    for (;;) pause();
  }
  return pid;
}

/* A standby's arguments, read from the lifeline (see above); 0 once
 * read and its log taken, -1 if the lifeline ended first or they are
 * malformed. Nothing follows them on the lifeline. */
static int read_standby_arguments(void) {
  static char buf[5 * 4096 + 8];
  static const char *log_path;
  const char **fields[] = {&tables_path, &state_dir, &aid, &commit_path, &log_path};
  size_t n = 0;
  for (;;) {
    if (n == sizeof buf) return -1;
    ssize_t r = read(lifeline_fd, buf + n, sizeof buf - n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    n += (size_t)r;
    /* Complete: five non-empty fields and the empty one. */
    size_t at = 0;
    int got = 0;
    while (got < 5) {
      char *end = memchr(buf + at, 0, n - at);
      if (!end || end == buf + at) break;
      at = (size_t)(end - buf) + 1;
      got++;
    }
    if (got < 5 || at >= n) continue;
    if (buf[at] != 0 || at + 1 != n) return -1;
    break;
  }
  for (size_t at = 0, k = 0; k < 5; k++) {
    *fields[k] = buf + at;
    at += strlen(buf + at) + 1;
  }
  int log = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log < 0) die(log_path);
  dup2(log, 1);
  dup2(log, 2);
  close(log);
  return 0;
}

/* Signals every process of the application but init itself: those of
 * the table that really are (our descendants, or `appshot exec`'s), never
 * a PID someone wrote there (-1, 0, another user's process). */
static void signal_application(int sig) {
  int32_t vid, sid;
  uint32_t flags;
  struct appshot_used u;
  appshot_used_begin(&u, tables, tables_fd, APPSHOT_PID);
  for (int64_t s; (s = appshot_used_next(&u)) >= 0;)
    if (appshot_entry_at(tables, APPSHOT_PID, (uint32_t)s, &vid, &sid, &flags, NULL) &&
        !(flags & (APPSHOT_F_INIT | APPSHOT_F_THREAD)))
      appshot_signal_member_fd(sid, sig, getpid(), tables_path, tables_fd);
}

/* A restored application's first process: the command it was started
 * with, virtual PID 2, while it is still our child, as `first` is for an
 * application we started, so that a signal passed on reaches it alone as
 * it did before the snapshot. 0: none (it had exited before, a daemon's
 * first process, or has since), and the signal goes to every process.
 * The table, which the application may write, only names it: a process
 * (not a thread) whose parent we are, which no one else can reap and so
 * whose PID cannot be another's before we wait for it. */
static pid_t restored_first(void) {
  int32_t sid;
  if (!appshot_v2s(tables, APPSHOT_PID, 2, &sid) || sid <= 1 || sid == getpid()) return 0;
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%d/status", (int)sid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  const char *tgid = strstr(buf, "\nTgid:"), *ppid = strstr(buf, "\nPPid:");
  if (!tgid || !ppid || atoi(tgid + 6) != sid || atoi(ppid + 6) != getpid()) return 0;
  return sid;
}

/* A seed was reaped: its PID is no longer ours to kill. */
static void seed_reaped(pid_t pid) {
  for (int k = 0; k < seed_count; k++)
    if (seed_pids[k] == pid) seed_pids[k] = 0;
}

static int ipc_gone(enum appshot_kind kind, int32_t sid) {
  int rc;
  switch (kind) {
    case APPSHOT_SEMID: {
      struct semid_ds ds;
      rc = semctl(sid, 0, IPC_STAT, &ds);
      break;
    }
    case APPSHOT_SHMID: {
      struct shmid_ds ds;
      rc = shmctl(sid, IPC_STAT, &ds);
      break;
    }
    case APPSHOT_MSGID: {
      struct msqid_ds ds;
      rc = msgctl(sid, IPC_STAT, &ds);
      break;
    }
    default: return 0;
  }
  return rc != 0 && (errno == EINVAL || errno == EIDRM);
}

/* Whether a live thread of the application is between a wait call's
 * answer and its translation: the child the kernel reported is dead and
 * reaped, but the thread still has to look its system PID up (it may
 * have been stopped there, by job control or a debugger, for longer than
 * a sweep takes to come: its wait then returned a made-up virtual PID).
 * A slot whose holder is gone is not waited for. */
static int wait_answer_pending(void) {
  for (uint32_t slot = 0; slot < APPSHOT_WAIT_SLOTS; slot++) {
    int32_t holder, stid;
    if (appshot_wait_answered(tables, slot, &holder) &&
        appshot_v2s(tables, APPSHOT_PID, holder, &stid) && kill(stid, 0) == 0)
      return 1;
  }
  return 0;
}

/* The pair each PID slot held when the last sweep found its process gone
 * (0: it did not). */
static uint64_t found_dead[APPSHOT_PID_CAPACITY];

/* Whether the process of the PID entry in `slot` is gone and its entry may
 * go. The application's own wait wrappers drop the entries of the children
 * they reap; what is left here is for processes reaped by a parent without
 * our library. A child reaped by a wrapper whose thread has not translated
 * the answer yet is just as gone in the system, and its entry must stay
 * (the thread would make up a virtual PID): so the answers are looked at
 * after the process was found gone, not once before the walk, while a
 * fast-forking application reaps many children. And only on the second
 * sweep that finds the same pair gone: the kernel releases the child
 * before it writes the answer (wait4's rusage, waitid's siginfo), so
 * right after the reap no answer shows yet. */
static int pid_entry_dead(uint32_t slot, int32_t vid, int32_t sid,
                          uint32_t flags) {
  uint64_t pair = ((uint64_t)(uint32_t)vid << 32) | (uint32_t)sid;
  if ((flags & APPSHOT_F_INIT) || kill(sid, 0) == 0 || errno != ESRCH) {
    found_dead[slot] = 0;
    return 0;
  }
  int again = found_dead[slot] == pair;
  found_dead[slot] = pair;
  return again && !wait_answer_pending();
}

/* Drops entries whose object no longer exists: processes reaped by a parent
 * that does not run our library (or that ignores SIGCHLD), threads that died
 * with their process, IPC objects removed from outside. Each table read up
 * to its last entry, not its capacity (appshot_scan_begin: every 2 s, a
 * read of every slot allocated the file's free pages). A slot past the
 * last entry keeps whatever found_dead said of it: the same pair found
 * there again, gone both times, is gone. */
static void sweep(void) {
  int32_t vid, sid;
  uint32_t flags;
  for (int k = 0; k <= APPSHOT_MSGID; k++) {
    /* The layout's, not the file's (which the application can write):
     * found_dead's size holds. */
    uint32_t capacity = appshot_capacity((enum appshot_kind)k);
    struct appshot_scan sc;
    appshot_scan_begin(tables, (enum appshot_kind)k, &sc);
    for (uint32_t s = 0; s < capacity && !appshot_scan_over(tables, (enum appshot_kind)k, &sc); s++) {
      if (!appshot_entry_at(tables, (enum appshot_kind)k, s, &vid, &sid,
                            &flags, NULL)) {
        if (k == APPSHOT_PID) found_dead[s] = 0;
        continue;
      }
      appshot_scan_found(&sc);
      if (k == APPSHOT_PID) {
        /* Only this pair: the PID may have been reaped, forgotten and
         * handed to a new process of the application since. */
        if (pid_entry_dead(s, vid, sid, flags) && appshot_forget_pair(tables, vid, sid)) {
          found_dead[s] = 0;
          appshot_scan_removed(&sc);
        }
      } else if (ipc_gone((enum appshot_kind)k, sid)) {
        /* Its recorded PIDs too: a new object may get the id. */
        appshot_ipc_pids_forget(tables, (enum appshot_kind)k, sid);
        if (appshot_unmap_system(tables, (enum appshot_kind)k, sid)) appshot_scan_removed(&sc);
      }
    }
  }
}

/* Whether a process of the application lives that is not our descendant:
 * one started with `appshot exec`, whose parent is the CLI. Every entry,
 * not the scan API's walk to the last one (which may miss an entry while
 * others come and go): a "no" here ends the application. */
static int others_alive(void) {
  int32_t vid, sid;
  uint32_t flags;
  struct appshot_used u;
  appshot_used_begin(&u, tables, tables_fd, APPSHOT_PID);
  for (int64_t s; (s = appshot_used_next(&u)) >= 0;)
    if (appshot_entry_at(tables, APPSHOT_PID, (uint32_t)s, &vid, &sid, &flags, NULL) &&
        !(flags & (APPSHOT_F_INIT | APPSHOT_F_THREAD)) && kill(sid, 0) == 0 &&
        appshot_pid_belongs_fd(sid, getpid(), tables_path, tables_fd))
      return 1;
  return 0;
}

/* The application's SysV objects go with it, as with a container's IPC
 * namespace: once the tables are gone, nothing could reach them by the keys
 * the application used anyway. Only those the kernel confirms are its own
 * (appshot_ipc_owned): an id written into the tables from outside names
 * someone else's object. */
static void remove_ipc_objects(void) {
  int32_t vid, sid;
  /* The id tables, then the key tables: a keyed object whose restore was
   * killed after making it and before binding its id is found by its key,
   * which the restore binds first (CreateBound, addon_restore.cc). */
  static const enum appshot_kind kinds[] = {APPSHOT_SEMID,  APPSHOT_SHMID,  APPSHOT_MSGID,
                                            APPSHOT_SEMKEY, APPSHOT_SHMKEY, APPSHOT_MSGKEY};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    enum appshot_kind k = kinds[i];
    struct appshot_used u;
    appshot_used_begin(&u, tables, tables_fd, (enum appshot_kind)k);
    for (int64_t s; (s = appshot_used_next(&u)) >= 0;)
      if (appshot_entry_at(tables, (enum appshot_kind)k, (uint32_t)s, &vid, &sid, NULL, NULL))
        appshot_ipc_remove_owned_started(tables, (enum appshot_kind)k, sid, trusted_salt,
                                         trusted_created, getpid(), tables_path, &starter);
  }
}

/* Renamed first, then emptied and removed: a registration is either whole
 * or gone, even if we are killed half-way (the CLI sweeps the hidden
 * leftover; see removeDir in src/registry.ts). */
static void remove_state_dir(void) {
  char doomed[4096];
  const char *slash = strrchr(state_dir, '/');
  if (!slash) return;
  snprintf(doomed, sizeof doomed, "%.*s/.%s.removed-%d",
           (int)(slash - state_dir), state_dir, slash + 1, (int)getpid());
  if (rename(state_dir, doomed) != 0) return;
  DIR *d = opendir(doomed);
  if (d) {
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
      if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
        unlinkat(dirfd(d), de->d_name, 0);
    closedir(d);
  }
  rmdir(doomed);
}

static void clean_up(void) {
  remove_ipc_objects();
  unlink(tables_path);
  remove_state_dir();
}

/* The registry directory's file NAME, in buf. */
static const char *state_file(char *buf, size_t size, const char *name) {
  snprintf(buf, size, "%s/%s", state_dir, name);
  return buf;
}

/* --- When output reached the log (appshot logs --timestamps) ------------
 *
 * The application writes its log file itself: nothing of appshot is in
 * between to note when a line came. Init watches the log's directory
 * instead and appends "MILLISECONDS SIZE" lines to .log.times: at that
 * wall-clock time the log held SIZE bytes. A line is then as old as the
 * first record that covers its end. At most one record per LOG_TIMES_MS:
 * a burst of writes is one pending SIGIO until init looks.
 *
 * The watch is dnotify (fcntl F_NOTIFY), not inotify: an inotify instance
 * counts against the user's max_user_instances (128 by default), which is
 * the application's to use; one per init took them all once a hundred
 * applications ran, and the applications' own inotify_init1 failed with
 * EMFILE. dnotify has no such limit; its signal is the SIGIO init already
 * waits for. It says only that something in the directory changed (our
 * own .log.times too), so the log's size says whether the log did. Where
 * F_NOTIFY fails, the size is looked at every LOG_POLL_MS instead: coarser
 * times, never none. The file is thinned when it reaches LOG_TIMES_MAX, so
 * a chatty application cannot fill the disk with it. */
#define LOG_TIMES_MS 10
#define LOG_POLL_MS 1000
#define LOG_TIMES_MAX (256 * 1024)
static int log_watch = -1, log_fd = -1, times_fd = -1;
/* A SIGIO came since the log's size was last looked at: it may have
 * grown (the signal also comes for the lifeline, and for any file of the
 * directory). */
static int log_maybe_changed = 1;
static int64_t times_last_tick = -LOG_POLL_MS; /* monotonic ms */
static off_t times_last_size = 0, times_written = 0; /* an empty log needs no record */

static int64_t clock_ms(clockid_t clock) {
  struct timespec t;
  clock_gettime(clock, &t);
  return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int open_times_file(int flags) {
  char path[4096];
  return open(state_file(path, sizeof path, ".log.times"), O_WRONLY | O_APPEND | O_CLOEXEC | flags, 0600);
}

/* Keeps every other record and the last: the same span of the log at
 * half the resolution. Where the log shrank (truncated), the reader starts
 * afresh (src/logtimes.ts), so every record before is dropped: a log
 * truncated over and over still thins. Streamed through small buffers
 * (the file may be larger than the limit: carried from elsewhere);
 * written aside and renamed over, so a reader sees the old file or the
 * new one. A line that is not a record ends it, as it ends the reader. */
struct times_thinning {
  int out;
  char buf[4096];
  size_t used;
  off_t written;
  int ok;
};

static void thinning_put(struct times_thinning *t, const char *line, size_t len) {
  if (t->used + len > sizeof t->buf) {
    t->ok = t->ok && write(t->out, t->buf, t->used) == (ssize_t)t->used;
    t->used = 0;
  }
  memcpy(t->buf + t->used, line, len);
  t->used += len;
  t->written += len;
}

static void thin_times_file(void) {
  char path[4096], tmp[4096], chunk[4096], line[64], held[64];
  int in = open(state_file(path, sizeof path, ".log.times"), O_RDONLY | O_CLOEXEC);
  if (in < 0) return;
  state_file(tmp, sizeof tmp, ".log.times.tmp");
  struct times_thinning t = {.out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), .ok = 1};
  if (t.out < 0) {
    close(in);
    return;
  }
  size_t len = 0, held_len = 0, index = 0;
  long long held_size = -1;
  int ended = 0;
  ssize_t n;
  while (!ended && (n = read(in, chunk, sizeof chunk)) > 0) {
    for (ssize_t k = 0; k < n && !ended; k++) {
      if (len == sizeof line - 1) { ended = 1; break; }
      line[len++] = chunk[k];
      if (chunk[k] != '\n') continue;
      line[len] = 0;
      long long ms, size;
      if (sscanf(line, "%lld %lld", &ms, &size) != 2) { ended = 1; break; }
      if (held_len && size < held_size) {
        /* The log shrank here: nothing before counts any more. */
        t.ok = t.ok && ftruncate(t.out, 0) == 0 && lseek(t.out, 0, SEEK_SET) == 0;
        t.used = 0;
        t.written = 0;
        index = 0;
        held_len = 0;
      }
      if (held_len && index % 2 == 0) thinning_put(&t, held, held_len);
      if (held_len) index++;
      memcpy(held, line, len);
      held_len = len;
      held_size = size;
      len = 0;
    }
  }
  close(in);
  if (held_len) thinning_put(&t, held, held_len);
  t.ok = t.ok && write(t.out, t.buf, t.used) == (ssize_t)t.used;
  t.ok = close(t.out) == 0 && t.ok;
  if (!t.ok || rename(tmp, path) != 0) {
    unlink(tmp);
    return;
  }
  int reopened = open_times_file(0);
  if (reopened < 0) return;
  dup2(reopened, times_fd);
  close(reopened);
  fcntl(times_fd, F_SETFD, FD_CLOEXEC);
  times_written = t.written;
}

static void append_log_time(int64_t wall, off_t size) {
  char line[64];
  int len = snprintf(line, sizeof line, "%lld %lld\n", (long long)wall, (long long)size);
  if (write(times_fd, line, len) == len) times_written += len;
  if (times_written >= LOG_TIMES_MAX) thin_times_file();
}

/* Only for a log file (an application started with run --detach, or
 * restored); after the seeds are forked, which must not inherit these. */
static void watch_log(void) {
  struct stat st;
  char path[4096];
  if (fstat(1, &st) != 0 || !S_ISREG(st.st_mode)) return;
  /* Its own descriptor of the log: init's stdout goes to /dev/null once
   * the first process ends and others live on. */
  log_fd = fcntl(1, F_DUPFD_CLOEXEC, 3);
  if (log_fd < 0 || (times_fd = open_times_file(O_CREAT)) < 0) return;
  struct stat times;
  if (fstat(times_fd, &times) == 0) times_written = times.st_size;
  /* The directory the log is in, as the log's descriptor names it. */
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", log_fd);
  ssize_t n = readlink(self, path, sizeof path - 1);
  char *slash = n > 0 ? memrchr(path, '/', (size_t)n) : NULL;
  if (slash && !(n > 10 && memcmp(path + n - 10, " (deleted)", 10) == 0)) {
    *slash = 0;
    log_watch = open(slash == path ? "/" : path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (log_watch >= 0 && fcntl(log_watch, F_NOTIFY, DN_MODIFY | DN_MULTISHOT) != 0) {
      close(log_watch);
      log_watch = -1;
    }
  }
  /* What came before the watch (the first process's first lines, a
   * restored application's log): as of now. */
  struct stat now;
  if (fstat(log_fd, &now) == 0 && now.st_size > 0) {
    times_last_tick = clock_ms(CLOCK_MONOTONIC);
    times_last_size = now.st_size;
    append_log_time(clock_ms(CLOCK_REALTIME), now.st_size);
  }
}

/* Notes the log's size now if it changed. Returns the milliseconds until
 * a pending change may be noted, or the next look without a watch (the
 * loop waits no longer), or -1. The interval is on the monotonic clock:
 * a wall clock set back must not stop the records. */
static int64_t note_log_time(void) {
  if (times_fd < 0) return -1;
  int64_t tick = clock_ms(CLOCK_MONOTONIC);
  int64_t interval = log_watch >= 0 ? LOG_TIMES_MS : LOG_POLL_MS;
  if (tick - times_last_tick < interval) {
    if (log_watch < 0) return times_last_tick + interval - tick;
    /* Too soon: looked at when the interval is over, if a change may
     * have come; later writes' signals merge meanwhile. */
    return log_maybe_changed ? times_last_tick + interval - tick : -1;
  }
  int changed = log_watch < 0 || log_maybe_changed;
  log_maybe_changed = 0;
  if (log_watch < 0) times_last_tick = tick;
  struct stat st;
  if (!changed || fstat(log_fd, &st) != 0 || st.st_size == times_last_size)
    return log_watch < 0 ? interval : -1;
  append_log_time(clock_ms(CLOCK_REALTIME), st.st_size);
  times_last_tick = tick;
  times_last_size = st.st_size;
  return log_watch < 0 ? interval : -1;
}

/* Records how the application ended, for the CLI (see above). Written
 * aside and renamed into place: a reader sees all of it or none. */
static void write_exit_file(int code) {
  char path[4096], tmp[4096];
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  snprintf(tmp, sizeof tmp, "%s/.exit.tmp", state_dir);
  FILE *f = fopen(tmp, "w");
  if (!f) return;
  fprintf(f, "%d %lld\n", code, (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000);
  if (fclose(f) == 0) rename(tmp, state_file(path, sizeof path, "exit"));
  else unlink(tmp);
}

/* The application ended normally: the kernel's objects go, its record
 * stays as an ended one, unless a snapshot ended it (then the AID is
 * released for the image's restore, and a foreground `appshot run` is
 * told where its application went). */
static void end_application(int code) {
  remove_ipc_objects();
  unlink(tables_path);
  char path[4096], image[3500];
  FILE *f = fopen(state_file(path, sizeof path, "released"), "r");
  if (!f) {
    write_exit_file(code);
    return;
  }
  size_t n = fread(image, 1, sizeof image - 1, f);
  fclose(f);
  image[n] = 0;
  image[strcspn(image, "\n")] = 0;
  remove_state_dir();
  if (status_fd >= 0) {
    char line[sizeof image + 4];
    int len = snprintf(line, sizeof line, "R %s\n", image);
    if (write(status_fd, line, (size_t)len) < 0) {
      close(status_fd);
      status_fd = -1;
    }
  }
}

/* SIGKILL to every descendant of `pid`, found through the children files
 * of each of its threads, recursively: an abandoned restore's processes,
 * whether or not they are in the tables (a raw fork, a static binary). We
 * are their subreaper, so none can leave our tree. Called again until none
 * is left: one may fork while we walk. */
static void kill_descendants(pid_t pid, int depth) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
  DIR *tasks = opendir(path);
  if (!tasks || depth > 64) {
    if (tasks) closedir(tasks);
    return;
  }
  struct dirent *t;
  while ((t = readdir(tasks)) != NULL) {
    if (t->d_name[0] == '.') continue;
    char file[384], buf[4096];
    snprintf(file, sizeof file, "/proc/%d/task/%s/children", (int)pid, t->d_name);
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) continue;
    buf[n] = '\0';
    for (char *p = buf, *end; *p; p = end) {
      long child = strtol(p, &end, 10);
      if (end == p) break;
      if (child > 1) {
        kill((pid_t)child, SIGKILL);
        kill_descendants((pid_t)child, depth + 1);
      }
    }
  }
  closedir(tasks);
}

/* After the lifeline ended: 1 if the restore was committed, 0 if it was
 * abandoned, in which case every process of the application is killed:
 * those already in the tables, and seeds that were never made one. Traced
 * processes die with their tracer anyway (PTRACE_O_EXITKILL). */
static int restore_committed(void) {
  close(lifeline_fd);
  lifeline_fd = -1;
  if (access(commit_path, F_OK) == 0) {
    /* Recorded in our own directory too: the commit file may be shared
     * by a batch and is swept once its driver is long gone. */
    char mark[4096];
    snprintf(mark, sizeof mark, "%s/committed", state_dir);
    int fd = open(mark, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) close(fd);
    return 1;
  }
  signal_application(SIGKILL);
  /* Our children: a seed not reaped yet still holds its PID. */
  for (int k = 0; k < seed_count; k++)
    if (seed_pids[k] > 1) kill(seed_pids[k], SIGKILL);
  kill_descendants(getpid(), 0);
  return 0;
}

/* Whether the lifeline has ended (EOF or error): polled, never blocking. */
static int lifeline_ended(void) {
  struct pollfd p = {lifeline_fd, POLLIN, 0};
  if (poll(&p, 1, 0) <= 0) return 0;
  char buf[64];
  ssize_t n = read(lifeline_fd, buf, sizeof buf);
  return n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN);
}

/* The last process is gone. Clean up before reporting, so that when
 * `appshot run` returns the application is recorded as ended (or its AID
 * free, after a snapshot). An abandoned restore's
 * registry directory stays for the CLI to release (see above). Returns -1,
 * to be called again, while the lifeline is still open: the processes may
 * have died with their tracer (PTRACE_O_EXITKILL) before its other
 * threads let go of the lifeline, or the driver is undoing a failed
 * restore; either way its end says whether the restore committed. */
static int finish(int abandoned, int code) {
  if (lifeline_fd >= 0) {
    if (!lifeline_ended()) return -1;
    if (!restore_committed()) abandoned = 1;
  }
  if (abandoned) {
    remove_ipc_objects();
    unlink(tables_path);
    return 137;
  }
  end_application(code);
  report("X %ld\n", code, 0);
  return code;
}

/* The application may shrink its table file at any moment: every process
 * of it holds the file read-write, whatever uid it runs as, and a touch of
 * our mapping past the file's end is SIGBUS, which ended the application's
 * supervisor (review r363: its processes then ran on outside appshot's
 * reach). Such a fault puts a page of zeros, ours alone, in place of the
 * page touched, and the touch goes on: it reads what an emptied file holds,
 * nothing, and what is written there is lost, as the truncation lost it.
 * The next round of the main loop maps the file over the whole mapping
 * again (remap_tables). Plain memory work, nothing of the tables' code, so
 * it may run while we hold the table lock (which leaves SIGBUS unblocked
 * here: appshot_set_lock_spares_faults). Any other SIGBUS is the default
 * action's, as before. */
static volatile sig_atomic_t tables_patched;
static uintptr_t tables_page;

static void on_tables_fault(int sig, siginfo_t *si, void *uc) {
  (void)uc;
  const uintptr_t at = (uintptr_t)si->si_addr, base = (uintptr_t)tables;
  if (si->si_code > 0 && base && at >= base && at < base + appshot_table_bytes()) {
    const uintptr_t page = at & ~(tables_page - 1);
    long r = appshot_raw_syscall(SYS_mmap, (long)page, (long)tables_page, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (r == (long)page) {
      tables_patched = 1;
      return;
    }
  }
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, NULL);
  if (si->si_code <= 0) raise(sig);
}

static void guard_tables(void) {
  long page = sysconf(_SC_PAGESIZE);
  tables_page = page > 0 ? (uintptr_t)page : 4096;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_tables_fault;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, NULL);
  appshot_set_lock_spares_faults(1);
}

/* Why a page of zeros went in, said once each on our stderr (the
 * application's log): a write that met it is lost. The file is sparse
 * (only its first page is written at its creation), so a first write to
 * any other page on a full filesystem is the same SIGBUS as a truncation,
 * with the file still its full size. Told apart as the addon does
 * (addon.cc ThrowStep): full size, and no room for a table left on its
 * filesystem (the size alone would blame a full disk on an application
 * that truncated its file and set its size back since). */
static void say_tables_patched(void) {
  static int said_full, said_short;
  struct stat st;
  struct statfs fs;
  const int full_size = fstat(tables_fd, &st) == 0 && (uint64_t)st.st_size == appshot_table_bytes() &&
                        fstatfs(tables_fd, &fs) == 0 &&
                        (uint64_t)fs.f_bavail * (uint64_t)fs.f_bsize < appshot_table_bytes();
  int *said = full_size ? &said_full : &said_short;
  if (*said) return;
  *said = 1;
  if (full_size)
    fprintf(stderr, "appshot-init: a write to the tables of %s was lost: no space left on the filesystem of %s\n",
            aid ? aid : "?", tables_path ? tables_path : "its table file");
  else
    fprintf(stderr, "appshot-init: a process of the application truncated %s, the tables of %s: what appshot-init wrote there meanwhile is lost\n",
            tables_path ? tables_path : "its table file", aid ? aid : "?");
}

/* The file mapped again where the pages of zeros went in (see above).
 * A MAP_FIXED that fails may already have unmapped the range (older
 * kernels unmap before they map), and a touch of a hole there is SIGSEGV,
 * which would end this supervisor and leave the application's processes
 * outside appshot's reach: the worse outcome. So on failure the range is
 * filled with private zeros instead, as the fault handler does page by
 * page (reads find nothing, writes are lost, as with a truncated file),
 * and the file is mapped again on the next round. Ending the application
 * here instead would turn a passing shortage (ENOMEM, a map count at its
 * limit) into the loss of every process of it. */
static void remap_tables(void) {
  if (!tables_patched) return;
  tables_patched = 0;
  say_tables_patched();
  const size_t len = appshot_table_bytes();
  if (mmap(tables, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, tables_fd, 0) == (void *)tables) return;
  static int said_remap;
  if (!said_remap) {
    said_remap = 1;
    fprintf(stderr, "appshot-init: mapping the tables of %s again: %s (retrying)\n", aid ? aid : "?", strerror(errno));
  }
  mmap(tables, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  tables_patched = 1;
}

static const int forwarded[] = {SIGTERM, SIGINT,  SIGQUIT, SIGHUP,
                                SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT};

int main(int argc, char **argv) {
  /* Our parent's PID, then its start time, then the PID again: if it died
   * in between, the start time may be of another process given its PID,
   * and none is noted. One that died before we ran is the one we were
   * reparented to, which the rule's "parent of init" accepts already. */
  pid_t parent = getppid();
  if (appshot_process_id_of(parent, &starter) != 0 || getppid() != parent)
    starter.pid = 0;
  int i = 1, seeds = -1, standby = 0;
  for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
    const char *opt = argv[i];
    if (i + 1 >= argc) break;
    const char *val = argv[++i];
    if (!strcmp(opt, "--tables")) tables_path = val;
    else if (!strcmp(opt, "--state-dir")) state_dir = val;
    else if (!strcmp(opt, "--preload")) preload_lib = val;
    else if (!strcmp(opt, "--aid")) aid = val;
    else if (!strcmp(opt, "--status-fd")) status_fd = atoi(val);
    else if (!strcmp(opt, "--seeds")) seeds = atoi(val);
    else if (!strcmp(opt, "--lifeline")) lifeline_fd = atoi(val);
    else if (!strcmp(opt, "--commit")) commit_path = val;
    else if (!strcmp(opt, "--standby")) standby = atoi(val) != 0;
    else if (!strcmp(opt, "--timens")) time_offsets = val;
    else {
      fprintf(stderr, "appshot-init: unknown option %s\n", opt);
      return 125;
    }
  }
  int usable = standby ? preload_lib && !tables_path && !state_dir && !aid && !commit_path && seeds >= 0 &&
                             seeds <= MAX_SEEDS && lifeline_fd >= 0 && status_fd >= 0
                       : tables_path && state_dir && preload_lib && aid && !(seeds < 0 && i + 1 >= argc) &&
                             seeds <= MAX_SEEDS && (lifeline_fd >= 0) == (commit_path != NULL) &&
                             (!time_offsets || seeds >= 0);
  if (!usable) {
    fprintf(stderr,
            "usage: appshot-init --tables PATH --state-dir DIR --preload LIB "
            "--aid A [--status-fd N] (-- cmd args... | --seeds N "
            "[--lifeline FD --commit PATH])\n"
            "       appshot-init --standby 1 --preload LIB --status-fd N --seeds N --lifeline FD\n");
    return 125;
  }
  char **cmd = seeds < 0 ? &argv[i + 1] : NULL;
  if (status_fd >= 0) fcntl(status_fd, F_SETFD, FD_CLOEXEC);
  if (lifeline_fd >= 0) fcntl(lifeline_fd, F_SETFD, FD_CLOEXEC);
  if (standby) {
    /* Its seeds first, with the mask a supervisor's seeds have, then its
     * arguments; no directory of anyone's held meanwhile. */
    if (chdir("/") != 0) die("/");
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) die("PR_SET_CHILD_SUBREAPER");
    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGCHLD);
    sigaddset(&blocked, SIGIO);
    for (size_t k = 0; k < sizeof forwarded / sizeof forwarded[0]; k++)
      sigaddset(&blocked, forwarded[k]);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    signal(SIGPIPE, SIG_IGN);
    map_seed_scratch();
    for (int k = 0; k < seeds; k++) {
      seed_pids[seed_count++] = fork_seed(1);
      report("C %ld %ld\n", seed_pids[seed_count - 1], (long)seed_scratch_at);
    }
    unmap_seed_scratch();
    if (read_standby_arguments() != 0) {
      for (int k = 0; k < seed_count; k++) kill(seed_pids[k], SIGKILL);
      return 0;
    }
  }

  tables_fd = open(tables_path, O_RDWR | O_CLOEXEC);
  if (tables_fd < 0) die(tables_path);
  tables = appshot_table_map_fd(tables_fd);
  if (!tables) die(tables_path);
  guard_tables();
  trusted_salt = tables->key_salt;
  /* Without it (a registration of an older appshot), our own start: later
   * than the truth, so at worst objects are left, never others' taken. */
  trusted_created = registered_created();
  if (trusted_created < 0) trusted_created = appshot_ipc_clock();
  if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) die("PR_SET_CHILD_SUBREAPER");
  /* The file is the application's to write: a lock word it wrote must not
   * hang its supervisor, which must still reap, forward and clean up. */
  appshot_set_lock_patience(2000);
  tables->init_pid = getpid();
  if (appshot_bind(tables, APPSHOT_PID, 1, getpid(), APPSHOT_F_INIT, 0) != 0)
    die("binding virtual PID 1");

  sigset_t waited, orig;
  sigemptyset(&waited);
  sigaddset(&waited, SIGCHLD);
  sigaddset(&waited, SIGIO);
  for (size_t k = 0; k < sizeof forwarded / sizeof forwarded[0]; k++)
    sigaddset(&waited, forwarded[k]);
  sigprocmask(SIG_BLOCK, &waited, &orig);
  if (lifeline_fd >= 0) {
    /* SIGIO (blocked, and waited for below) the moment the driver closes
     * it or dies: processes it leaves behind must not run on for long. */
    fcntl(lifeline_fd, F_SETOWN, getpid());
    fcntl(lifeline_fd, F_SETFL, O_ASYNC | O_NONBLOCK);
  }
  signal(SIGPIPE, SIG_IGN);

  int first_alive = 1, code = 0;
  pid_t first = -1;
  if (cmd) {
    first = launch(cmd, &orig);
    if (first < 0) {
      report("E %ld\n", -first, 0);
      clean_up();
      return -first == ENOENT ? 127 : 126;
    }
    int32_t first_vid = 0;
    appshot_s2v(tables, APPSHOT_PID, first, &first_vid);
    report("S %ld %ld\n", first_vid, first);
  } else {
    /* Restored applications run in the background from the start. */
    first_alive = 0;
    if (time_offsets) unshare_time_namespace(time_offsets);
    if (!standby) map_seed_scratch();
    for (int k = 0; !standby && k < seeds; k++) {
      seed_pids[seed_count++] = fork_seed(0);
      report("C %ld %ld\n", seed_pids[seed_count - 1], (long)seed_scratch_at);
    }
    unmap_seed_scratch();
    report("S 0 0\n", 0, 0);
  }
  watch_log();

  time_t next_sweep = time(NULL) + SWEEP_SECONDS;
  int abandoned = 0, empty = 0;
  for (;;) {
    remap_tables();
    if (lifeline_fd >= 0 && lifeline_ended() && !restore_committed()) abandoned = 1;
    /* Abandoned: whatever was forked meanwhile goes too, until none is left. */
    if (abandoned) kill_descendants(getpid(), 0);
    /* Sweep on a clock of its own: a steady stream of signals (orphans
     * exiting) must not put it off for ever. */
    time_t now = time(NULL);
    if (now >= next_sweep) {
      sweep();
      next_sweep = now + SWEEP_SECONDS;
      /* Out of descendants, waiting for `appshot exec` processes. */
      if (!first_alive) {
        pid_t reaped = waitpid(-1, NULL, WNOHANG);
        if (reaped > 0) {
          appshot_forget_process(tables, reaped);
          seed_reaped(reaped);
        } else if (reaped < 0 && errno == ECHILD && !others_alive()) {
          empty = 1;
        }
      }
    }
    if (empty) {
      int rc = finish(abandoned, code);
      if (rc >= 0) return rc;
    }
    /* While a restore is under way, the lifeline's end comes as SIGIO; it
     * is also looked at every 250 ms, should that signal not come. */
    struct timespec timeout = {next_sweep - now, 0};
    if (lifeline_fd >= 0 || abandoned) timeout = (struct timespec){0, 250 * 1000 * 1000};
    int64_t log_due = note_log_time();
    if (log_due >= 0 && log_due < (int64_t)timeout.tv_sec * 1000 + timeout.tv_nsec / 1000000)
      timeout = (struct timespec){log_due / 1000, (log_due % 1000) * 1000000};
    siginfo_t si;
    int sig = sigtimedwait(&waited, &si, &timeout);
    if (sig == SIGIO) log_maybe_changed = 1;
    if (sig < 0 || sig == SIGIO) continue;
    if (sig != SIGCHLD) {
      /* A terminal's Ctrl-C or Ctrl-\ already reached the whole foreground
       * process group, the application included: passing it on would
       * deliver it twice. */
      if ((sig == SIGINT || sig == SIGQUIT) && si.si_code == SI_KERNEL)
        continue;
      pid_t restored = first < 0 ? restored_first() : 0;
      if (first_alive) kill(first, sig);
      else if (restored > 0) kill(restored, sig);
      else signal_application(sig);
      continue;
    }
    int first_ended = 0, last = 0;
    for (;;) {
      int status;
      pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid > 0) {
        int32_t vpid = 0;
        appshot_s2v(tables, APPSHOT_PID, pid, &vpid);
        appshot_forget_process(tables, pid);
        seed_reaped(pid);
        if (pid == first) {
          first_alive = 0;
          first_ended = 1;
          code = exit_code_of(status);
        } else if (first < 0 && vpid == 2) {
          /* A restored application has no first process of ours; the
           * command it was started with, virtual PID 2, gives its code. */
          code = exit_code_of(status);
        }
        continue;
      }
      last = pid < 0 && errno == ECHILD && !others_alive();
      break;
    }
    if (last) {
      empty = 1;
      int rc = finish(abandoned, code);
      if (rc >= 0) return rc;
    }
    /* A snapshot is killing them all: report once they are gone, with
     * where they went (see end_application). */
    char released[4096];
    if (first_ended && access(state_file(released, sizeof released, "released"), F_OK) == 0)
      continue;
    if (first_ended) {
      /* Other processes live on. Report, leave the terminal's session so
       * that closing it does not hang them up through us, and let go of the
       * harness's stdio so that whoever reads it sees it end. */
      report("X %ld\n", code, 0);
      if (status_fd >= 0) close(status_fd);
      status_fd = -1;
      setsid();
      int null = open("/dev/null", O_RDWR);
      if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2) close(null);
      }
    }
  }
}
