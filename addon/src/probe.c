/* Feature probes (probe.h). Nothing a probe makes outlives it: descriptors
 * are closed, SysV objects removed, mappings unmapped, children reaped. */
#define _GNU_SOURCE
#include "probe.h"
#include "pages.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/userfaultfd.h>

/* The build machine's headers may predate these (as in pages.c). */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#define PROBE_UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#define PROBE_UFFD_FEATURE_WP_ASYNC (1ull << 15)
#ifndef TCP_REPAIR
#define TCP_REPAIR 19
#endif


static int err(void) { return errno ? errno : EIO; }

/* PAGEMAP_SCAN over [start, start+len) of this process; `track`: as dirty
 * tracking runs it (checking and re-arming write protection). */
static int pagemap_scan(uint64_t start, uint64_t len, int track) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return err();
  struct appshot_page_region vec[4];
  struct appshot_pm_scan_arg arg;
  memset(&arg, 0, sizeof arg);
  arg.size = sizeof arg;
  arg.flags = track ? APPSHOT_PM_SCAN_CHECK_WPASYNC | APPSHOT_PM_SCAN_WP_MATCHING : 0;
  arg.start = start;
  arg.end = start + len;
  arg.vec = (uint64_t)(uintptr_t)vec;
  arg.vec_len = 4;
  arg.category_mask = track ? APPSHOT_PAGE_IS_WRITTEN : 0;
  arg.category_anyof_mask = track ? 0 : APPSHOT_PAGE_IS_PRESENT;
  arg.return_mask = track ? APPSHOT_PAGE_IS_WRITTEN : APPSHOT_PAGE_IS_PRESENT;
  int rc = ioctl(fd, APPSHOT_PAGEMAP_SCAN, &arg) < 0 ? err() : 0;
  close(fd);
  return rc;
}

/* What dirty tracking does (src/snapshot/tracking.ts): a user-mode-only
 * userfaultfd with asynchronous write protection, registered on memory,
 * then (`scan`) PAGEMAP_SCAN reading and re-arming it. */
static int userfaultfd_wp(int scan) {
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
  if (uffd < 0) return err();
  long page = sysconf(_SC_PAGESIZE);
  void* mem = MAP_FAILED;
  int rc = 0;
  struct uffdio_api api;
  memset(&api, 0, sizeof api);
  api.api = UFFD_API;
  api.features = PROBE_UFFD_FEATURE_WP_ASYNC | PROBE_UFFD_FEATURE_WP_UNPOPULATED;
  if (ioctl(uffd, UFFDIO_API, &api) < 0) {
    rc = err();
    goto out;
  }
  mem = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    rc = err();
    goto out;
  }
  struct uffdio_register reg;
  memset(&reg, 0, sizeof reg);
  reg.range.start = (uint64_t)(uintptr_t)mem;
  reg.range.len = (uint64_t)page;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
    rc = err();
    goto out;
  }
  if (scan) rc = pagemap_scan((uint64_t)(uintptr_t)mem, (uint64_t)page, 1);
out:
  if (mem != MAP_FAILED) munmap(mem, (size_t)page);
  close(uffd);
  return rc;
}

static int sysv(int kind) {
  int id;
  if (kind == 0) id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
  else if (kind == 1) id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
  else id = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
  if (id < 0) return err();
  if (kind == 0) semctl(id, 0, IPC_RMID);
  else if (kind == 1) shmctl(id, IPC_RMID, NULL);
  else msgctl(id, IPC_RMID, NULL);
  return 0;
}

static int socket_option(int type, int protocol, int level, int name) {
  int fd = socket(AF_INET, type | SOCK_CLOEXEC, protocol);
  if (fd < 0) return err();
  int one = 1, rc = 0;
  if (level >= 0 && setsockopt(fd, level, name, &one, sizeof one) < 0) rc = err();
  close(fd);
  return rc;
}

/* In a child that exits at once: PR_SET_CHILD_SUBREAPER changes the
 * process it is called in, and this one is not to be changed. */
static int subreaper(void) {
  pid_t pid = fork();
  if (pid < 0) return err();
  if (pid == 0) _exit(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0 ? (errno & 0xff) : 0);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return err();
  return WIFEXITED(status) ? WEXITSTATUS(status) : EIO;
}

static int kcmp_self(void) {
  int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return err();
  const int KCMP_FILE = 0;
  long r = syscall(SYS_kcmp, getpid(), getpid(), KCMP_FILE, fd, fd);
  int rc = r < 0 ? err() : (r == 0 ? 0 : EINVAL);
  close(fd);
  return rc;
}

static int memfd(void) {
  int fd = (int)syscall(SYS_memfd_create, "appshot-check", MFD_CLOEXEC);
  if (fd < 0) return err();
  close(fd);
  return 0;
}

int probe_feature(const char* name) {
  errno = 0;
  long page = sysconf(_SC_PAGESIZE);
  if (!strcmp(name, "userfaultfd")) return userfaultfd_wp(0);
  if (!strcmp(name, "dirty_tracking")) return userfaultfd_wp(1);
  if (!strcmp(name, "pagemap_scan")) {
    /* On a page of our own stack. */
    uint64_t at = (uint64_t)(uintptr_t)&page & ~((uint64_t)page - 1);
    return pagemap_scan(at, (uint64_t)page, 0);
  }
  if (!strcmp(name, "tcp_repair")) return socket_option(SOCK_STREAM, 0, IPPROTO_TCP, TCP_REPAIR);
  if (!strcmp(name, "raw_socket")) return socket_option(SOCK_RAW, IPPROTO_RAW, -1, 0);
  if (!strcmp(name, "sysv_sem")) return sysv(0);
  if (!strcmp(name, "sysv_shm")) return sysv(1);
  if (!strcmp(name, "sysv_msg")) return sysv(2);
  if (!strcmp(name, "subreaper")) return subreaper();
  if (!strcmp(name, "kcmp")) return kcmp_self();
  if (!strcmp(name, "memfd")) return memfd();
  return -1;
}
