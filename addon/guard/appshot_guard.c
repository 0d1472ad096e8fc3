/*
 * appshot-guard: lets a snapshot's TCP connections out of repair mode the
 * moment the snapshot's process dies.
 *
 * A snapshot puts each established connection of the frozen application
 * in repair mode, with a filter that drops every packet
 * (src/resources/tcp.ts), and only it can let them out again: killed
 * (kill -9, the OOM killer) while it holds them, it would leave the
 * application, which the kernel lets go on, with connections that never
 * move again. So the snapshot starts this process (tcp_repair.c,
 * tcp_guard_start: posix_spawn, which costs appshot's memory nothing; in
 * a session of its own) and hands it a duplicate of each socket just
 * before the snapshot's filter is attached to the socket and it enters
 * repair mode.
 *
 * Usage (by appshot only): descriptor 0 is a SOCK_SEQPACKET unix socket
 * on which appshot sends tcp_guard_msg messages (tcp_repair.h): ADD, with
 * the socket (SCM_RIGHTS), whether the snapshot's filter may be attached
 * (never when the application has a filter of its own), and the
 * application's SO_REUSEADDR (which leaving repair mode clears); DISARM
 * exits touching nothing (appshot disarms it with SIGKILL instead, which
 * needs no message to get through: tcp_guard_disarm), once the sockets
 * are out of repair mode or the image carries them on. If the channel
 * ends without either,
 * appshot is gone: each socket still in repair mode is let out of it (no
 * window probe) and its SO_REUSEADDR set back, the snapshot's filter is
 * detached from each that has it (attached before repair mode), and it
 * exits. The next appshot command does the same from the snapshot's
 * journal (src/snapshot/ending.ts), where this could not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../src/tcp_repair.h"

typedef struct {
  int fd;
  int32_t locked;
  int32_t reuse;
} guarded;

/* As many as a snapshot could hold: untouched pages of the mapping cost
 * nothing. */
#define GUARD_MAX (1 << 20)

static void release(const guarded* g) {
  int on = 0;
  socklen_t len = sizeof on;
  int repaired = getsockopt(g->fd, SOL_TCP, TCP_REPAIR, &on, &len) == 0 && on == 1;
  int off = -1; /* TCP_REPAIR_OFF_NO_WP */
  /* Out of repair mode before the filter goes: a packet let in while the
   * socket is still in it is queued and acknowledged, and the
   * application, running again, is woken to read it and gets EPERM (in
   * repair mode only a peek reads), on which most close the connection.
   * Dropped meanwhile, the peer sends it again. */
  if (repaired && setsockopt(g->fd, SOL_TCP, TCP_REPAIR, &off, sizeof off)) return;
  /* Ours only: killed between attaching it and repair mode, or after the
   * snapshot let the socket out but before it took the filter away, the
   * socket has it though not in repair mode; never put in (killed before
   * either), it has none, or the application's. */
  int unused = 0;
  if (g->locked && tcp_is_locked(g->fd)) setsockopt(g->fd, SOL_SOCKET, SO_DETACH_FILTER, &unused, sizeof unused);
  /* Leaving repair mode cleared it. */
  if (repaired && g->reuse) setsockopt(g->fd, SOL_SOCKET, SO_REUSEADDR, &g->reuse, sizeof g->reuse);
}

int main(void) {
  /* Deaf to what is meant for appshot or a terminal (as the affinity
   * guard, addon_trace.cc): it ends when appshot does. */
  struct sigaction ignore;
  memset(&ignore, 0, sizeof ignore);
  ignore.sa_handler = SIG_IGN;
  const int deaf[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2};
  for (size_t i = 0; i < sizeof deaf / sizeof deaf[0]; i++) sigaction(deaf[i], &ignore, NULL);
  /* As many descriptors as it may hold: past the soft limit the kernel
   * would drop a socket handed over (MSG_CTRUNC) without a word. */
  struct rlimit files;
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  guarded* held = mmap(NULL, GUARD_MAX * sizeof(guarded), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (held == MAP_FAILED) return 1;
  size_t n = 0;
  for (;;) {
    tcp_guard_msg m;
    struct iovec iov = {&m, sizeof m};
    union {
      struct cmsghdr align;
      char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.buf;
    mh.msg_controllen = sizeof control.buf;
    ssize_t r = recvmsg(0, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) {
      /* All taken: a millisecond's nap before waiting for more, so that
       * the snapshot, which hands over a socket every few microseconds
       * with the application frozen, is not preempted by a wakeup of this
       * process for each one (up to 512 wait queued meanwhile). */
      struct timespec nap = {0, 1000000};
      nanosleep(&nap, NULL);
      struct pollfd p = {0, POLLIN, 0};
      while (poll(&p, 1, -1) < 0 && errno == EINTR) {
      }
      continue;
    }
    if (r <= 0) {
      /* appshot is gone: what it held is let out. */
      for (size_t i = 0; i < n; i++) release(&held[i]);
      return 0;
    }
    if (m.kind == TCP_GUARD_DISARM) return 0;
    struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
    if ((size_t)r < sizeof m || m.kind != TCP_GUARD_ADD || !c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    if (n == GUARD_MAX) {
      close(fd);
      continue;
    }
    held[n].fd = fd;
    held[n].locked = m.locked;
    held[n].reuse = m.reuse;
    n++;
  }
}
