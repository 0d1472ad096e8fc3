/* cgroup.procs, cgroup.threads and (cgroup v1) tasks: the PID or TID an
 * application writes there is a virtual one, and names its own process; the kernel would move
 * the system process of that number. Descriptors opened on such a file of
 * a cgroup filesystem are kept in a bitmap (set by the open wrappers,
 * cleared by close, dup2/dup3 and close_range, as signalfd's are), and a
 * write() to one that is a single decimal id is translated. "0" (the
 * writer itself) goes through as it is. Writes through stdio (fprintf,
 * which calls libc's internal write) and through writev or pwrite are not
 * seen (README). A list opened read-write holds its view (preload_view.c),
 * whose writes go through to the kernel's file from here too. */
#include "preload.h"

#include <string.h>
#include <sys/vfs.h>

#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270
#define CGROUP_TRACKED 4096 /* descriptors above are written untranslated */

static unsigned long g_cgroup_fds[CGROUP_TRACKED / (8 * sizeof(long))];
#define BIT(fd) (1UL << ((unsigned)(fd) % (8 * sizeof(long))))
#define WORD(fd) g_cgroup_fds[(unsigned)(fd) / (8 * sizeof(long))]

static int tracked(int fd) {
  return fd >= 0 && fd < CGROUP_TRACKED &&
         (__atomic_load_n(&WORD(fd), __ATOMIC_RELAXED) & BIT(fd));
}

static int names_file(const char *path, size_t n, const char *name) {
  size_t m = strlen(name);
  return n >= m && !memcmp(path + n - m, name, m) && (n == m || path[n - m - 1] == '/');
}

void cgroup_procs_opened(int fd, const char *path) {
  if (fd < 0 || fd >= CGROUP_TRACKED || !path) return;
  size_t n = strlen(path);
  if (!names_file(path, n, "cgroup.procs") && !names_file(path, n, "cgroup.threads") &&
      !names_file(path, n, "tasks")) return;
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0 || (sf.f_type != CGROUP2_SUPER_MAGIC && sf.f_type != CGROUP_SUPER_MAGIC)) return;
  __atomic_fetch_or(&WORD(fd), BIT(fd), __ATOMIC_RELAXED);
}

void cgroup_procs_forget(int fd) {
  if (UNLIKELY(tracked(fd))) __atomic_fetch_and(&WORD(fd), ~BIT(fd), __ATOMIC_RELAXED);
}

int cgroup_procs_marked(int fd) { return tracked(fd); }

int cgroup_procs_markable(int fd) { return fd >= 0 && fd < CGROUP_TRACKED; }

void cgroup_procs_mark(int fd, int on) {
  if (!on) cgroup_procs_forget(fd);
  else if (fd >= 0 && fd < CGROUP_TRACKED) __atomic_fetch_or(&WORD(fd), BIT(fd), __ATOMIC_RELAXED);
}

void cgroup_procs_forget_range(unsigned int first, unsigned int last) {
  for (unsigned int fd = first; fd <= last && fd < CGROUP_TRACKED; fd++) cgroup_procs_forget((int)fd);
}

/* Whether `fd`, marked when it was opened, still is a cgroup.procs or
 * cgroup.threads. A descriptor closed past our close (fclose and other
 * internal closes of glibc, a raw system call) keeps its mark, and the next
 * file given its number must not have its data rewritten. Only writes to
 * marked descriptors pay for this. */
static int still_procs(int fd) {
  struct statfs sf;
  if (SYS2(fstatfs, fd, &sf) != 0 || (sf.f_type != CGROUP2_SUPER_MAGIC && sf.f_type != CGROUP_SUPER_MAGIC))
    return 0;
  char link[32] = "/proc/self/fd/", rev[12];
  size_t n = strlen(link);
  int k = 0;
  unsigned u = (unsigned)fd;
  do rev[k++] = (char)('0' + u % 10); while ((u /= 10) > 0);
  while (k > 0) link[n++] = rev[--k];
  link[n] = 0;
  char target[PATH_MAX];
  long len = SYS3(readlink, link, target, sizeof target);
  return len > 0 && (names_file(target, (size_t)len, "cgroup.procs") ||
                     names_file(target, (size_t)len, "cgroup.threads") ||
                     names_file(target, (size_t)len, "tasks"));
}

/* The kernel's isspace, which strips around the id. */
static int is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

ssize_t cgroup_write_ids(int fd, const char *buf, size_t count) {
  size_t i = 0;
  while (i < count && is_space(buf[i])) i++;
  size_t start = i;
  long v = 0;
  while (i < count && buf[i] >= '0' && buf[i] <= '9' && i - start < 10) v = v * 10 + (buf[i++] - '0');
  size_t digits = i - start;
  while (i < count && is_space(buf[i])) i++;
  /* Past INT_MAX the kernel refuses it (EINVAL); (pid_t)v would name
   * another process. */
  if (digits == 0 || i != count || v == 0 || v > INT_MAX) return libc_ret(SYS3(write, fd, buf, count));
  pid_t sid;
  if (!v2s_pid((pid_t)v, &sid)) return fail(ESRCH); /* no such process of the application */
  char out[16];
  int n = 0;
  char rev[12];
  do {
    rev[n++] = (char)('0' + sid % 10);
    sid /= 10;
  } while (sid > 0);
  for (int k = 0; k < n; k++) out[k] = rev[n - 1 - k];
  out[n] = '\n';
  long r = SYS3(write, fd, out, n + 1);
  return r < 0 ? libc_ret(r) : (ssize_t)count;
}

/* A write to a marked descriptor: a cgroup's list (the id translated), or
 * the view of one or of a sched file opened read-write, written through to
 * the kernel's file (preload_view.c); anything else (a file that took a
 * marked number past our close) as it is, its mark dropped. */
static NOINLINE ssize_t cgroup_write(int fd, const char *buf, size_t count) {
  ID_WINDOW();
  if (still_procs(fd)) return cgroup_write_ids(fd, buf, count);
  ssize_t r;
  if (view_write_through(fd, buf, count, &r)) return r;
  cgroup_procs_forget(fd);
  return libc_ret(SYS3(write, fd, buf, count));
}

API ssize_t write(int fd, const void *buf, size_t count) {
  ensure_init();
  if (UNLIKELY(tracked(fd)) && g_h) return cgroup_write(fd, buf, count);
  /* Called by dlsym itself, while init resolves REAL(write)? */
  if (UNLIKELY(!real_fn[R_write])) return libc_ret(SYS3(write, fd, buf, count));
  return REAL(write)(fd, buf, count); /* a cancellation point: glibc's */
}
