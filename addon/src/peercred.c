/* A unix connection made again with the peer credentials it had.
 *
 * The kernel records who is at the other end of a unix connection when it
 * is made: socketpair(2) gives both ends the maker's credentials, listen(2)
 * records the listener's (which the end that connects then sees), and
 * connect(2) the connecting thread's (which the accepted end sees). A
 * server reads them with SO_PEERCRED (effective uid and gid) and
 * SO_PEERGROUPS to decide what its peer may do. Made by the restorer, a
 * connection between two of the application's processes would name the
 * restorer, root for a root restore: an unprivileged child would be taken
 * for root. So each end is made by a thread of ours holding the effective
 * ids and groups its peer had, as the image recorded them. A listener
 * likewise listens as it had, or every client would take its server for
 * root.
 *
 * Raw system calls for the credentials, never glibc's setresuid or
 * setgroups, which change every thread of the process (its SETXID
 * broadcast): only the short-lived thread changes, and it ends with its
 * call (as fsident.c does for path operations). */
#define _GNU_SOURCE
#include "peercred.h"
#include "fsident.h"

#include <errno.h>
#include <linux/capability.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

int peercred_of(int fd, struct peercred* out, uint32_t* groups, uint32_t room) {
  struct ucred u;
  socklen_t len = sizeof u;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &u, &len) != 0) return -errno;
  socklen_t glen = room * sizeof *groups;
  int rc = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) != 0 ? -errno : 0;
  out->uid = u.uid;
  out->gid = u.gid;
  /* ERANGE: glen says how much room it takes. */
  out->ngroups = glen / sizeof *groups;
  out->groups = groups;
  return rc;
}

static int groups_are(const struct peercred* who) { return thread_groups_are(who->groups, who->ngroups); }

static int is_current(const struct peercred* who) {
  return (uint32_t)syscall(SYS_geteuid) == who->uid && (uint32_t)syscall(SYS_getegid) == who->gid && groups_are(who);
}

/* This thread takes `who`'s effective ids and groups, or -errno. Groups
 * first and the uid last: setgroups needs CAP_SETGID, which an effective
 * uid other than 0 drops. An unprivileged restorer can take only ids it
 * holds and its own groups (EPERM otherwise). */
static int take(const struct peercred* who) {
  if (who->ngroups > PEERCRED_MAX_GROUPS) return -EINVAL;
  if (!groups_are(who) && syscall(SYS_setgroups, (size_t)who->ngroups, who->groups) != 0) return -errno;
  if ((uint32_t)syscall(SYS_getegid) != who->gid && syscall(SYS_setresgid, -1, who->gid, -1) != 0) return -errno;
  if ((uint32_t)syscall(SYS_geteuid) != who->uid && syscall(SYS_setresuid, -1, who->uid, -1) != 0) return -errno;
  return 0;
}

struct as_call {
  const struct peercred* who;
  int (*op)(void*);
  void* arg;
  int rc;
};

static void* as_thread(void* arg) {
  struct as_call* c = arg;
  int rc = take(c->who);
  c->rc = rc ? rc : c->op(c->arg);
  return NULL;
}

/* op(arg) with `who`'s credentials (NULL: ours), on a thread of its own
 * unless they are this thread's already. */
static int run_as(const struct peercred* who, int (*op)(void*), void* arg) {
  if (!who || is_current(who)) return op(arg);
  struct as_call c = {who, op, arg, 0};
  pthread_t t;
  int rc = pthread_create(&t, NULL, as_thread, &c);
  if (rc != 0) return -rc;
  pthread_join(t, NULL);
  return c.rc;
}

struct pair_call {
  int type;
  int* fds;
};

static int make_pair(void* arg) {
  struct pair_call* c = arg;
  return socketpair(AF_UNIX, c->type | SOCK_CLOEXEC, 0, c->fds) == 0 ? 0 : -errno;
}

/* The listener's queue: room for ours behind a few strangers'. */
#define PAIR_BACKLOG 64
/* Listeners tried before giving up on a queue strangers keep full. */
#define PAIR_TRIES 8

struct listen_call {
  int type;
  int fd;
  struct sockaddr_un addr;
  socklen_t len;
};

/* A listener under an abstract name the kernel picks (autobind: a bind
 * with the family alone), which no one else can have taken; non-blocking,
 * for accept to say when its queue is empty. */
static int make_listener(void* arg) {
  struct listen_call* c = arg;
  c->fd = socket(AF_UNIX, c->type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (c->fd < 0) return -errno;
  struct sockaddr_un any = {.sun_family = AF_UNIX};
  c->len = sizeof c->addr;
  if (bind(c->fd, (struct sockaddr*)&any, sizeof any.sun_family) != 0 || listen(c->fd, PAIR_BACKLOG) != 0 ||
      getsockname(c->fd, (struct sockaddr*)&c->addr, &c->len) != 0) {
    int e = errno;
    close(c->fd);
    c->fd = -1;
    return -e;
  }
  return 0;
}

struct connect_call {
  int type;
  const struct listen_call* to;
  int fd;
};

/* Non-blocking: a queue that strangers filled answers EAGAIN rather than
 * hold the restore (a unix connect completes at once or not at all). */
static int make_client(void* arg) {
  struct connect_call* c = arg;
  c->fd = socket(AF_UNIX, c->type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (c->fd < 0) return -errno;
  if (connect(c->fd, (const struct sockaddr*)&c->to->addr, c->to->len) != 0) {
    int e = errno;
    close(c->fd);
    c->fd = -1;
    return -e;
  }
  return 0;
}

static int same(const struct peercred* a, const struct peercred* b) {
  /* NULL is the caller's own: the same as credentials that are those. */
  if (!a && !b) return 1;
  if (!a) return is_current(b);
  if (!b) return is_current(a);
  if (a->uid != b->uid || a->gid != b->gid || a->ngroups != b->ngroups) return 0;
  return memcmp(a->groups, b->groups, (size_t)a->ngroups * sizeof *a->groups) == 0;
}

/* The connection our client made, from the listener's queue: anyone on
 * the host may find the name (sock_diag lists it) and connect too, before
 * or after ours, and must neither be handed to the application nor hold
 * the restore up. Ours is the one whose peer is this process (the client
 * thread's); the others are closed. -EAGAIN if it is not there. */
static int accept_ours(int listener) {
  pid_t self = getpid();
  for (;;) {
    int s = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0 && errno == EINTR) continue;
    if (s < 0) return -errno;
    struct ucred u;
    socklen_t len = sizeof u;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &u, &len) == 0 && u.pid == self) return s;
    close(s);
  }
}

/* Back to blocking, as a socketpair's ends are. */
static int blocking(int fd) {
  int fl = fcntl(fd, F_GETFL);
  return fl >= 0 && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0 ? 0 : -errno;
}

int peercred_pair(int type, const struct peercred* see0, const struct peercred* see1, int fds[2]) {
  /* Both ends see one maker: a socketpair of its. */
  if (same(see0, see1)) {
    struct pair_call c = {type, fds};
    return run_as(see0, make_pair, &c);
  }
  /* Only a socketpair makes a datagram pair (nothing listens): two makers
   * cannot be, whatever an image says. */
  if (type != SOCK_STREAM && type != SOCK_SEQPACKET) return -EINVAL;
  /* Otherwise a connection: end 0 connects (and so sees whoever listened:
   * see0), end 1 is accepted (and sees whoever connected: see1). */
  int rc = -EAGAIN;
  for (int tries = 0; tries < PAIR_TRIES && rc == -EAGAIN; tries++) {
    struct listen_call l = {.type = type, .fd = -1};
    rc = run_as(see0, make_listener, &l);
    if (rc) return rc;
    struct connect_call c = {type, &l, -1};
    rc = run_as(see1, make_client, &c);
    if (rc == 0) {
      int s = accept_ours(l.fd);
      if (s >= 0 && (rc = blocking(c.fd)) == 0 && (rc = blocking(s)) == 0) {
        fds[0] = c.fd;
        fds[1] = s;
      } else {
        if (s >= 0) close(s);
        else rc = s;
        close(c.fd);
      }
    }
    close(l.fd);
  }
  return rc;
}

struct listen_now {
  int fd;
  int backlog;
};

static int do_listen(void* arg) {
  struct listen_now* c = arg;
  return listen(c->fd, c->backlog) == 0 ? 0 : -errno;
}

int peercred_listen(int fd, int backlog, const struct peercred* as) {
  struct listen_now c = {fd, backlog};
  return run_as(as, do_listen, &c);
}

int peercred_owned_socket(int family, int type, int protocol, uint32_t uid, uint32_t gid) {
  /* Raw calls: this thread's own ids, not glibc's broadcast to every
   * thread. A change of fsuid from 0 clears the file capabilities from the
   * effective set (and a change back sets those permitted): the set is
   * put back exactly as it was. */
  struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct caps[2];
  if (syscall(SYS_capget, &h, caps) != 0) return -1;
  long old_uid = syscall(SYS_setfsuid, -1), old_gid = syscall(SYS_setfsgid, -1);
  syscall(SYS_setfsgid, gid);
  syscall(SYS_setfsuid, uid);
  int taken = (uint32_t)syscall(SYS_setfsuid, -1) == uid && (uint32_t)syscall(SYS_setfsgid, -1) == gid;
  int fd = taken ? socket(family, type, protocol) : -1;
  int err = taken ? errno : EPERM;
  syscall(SYS_setfsuid, old_uid);
  syscall(SYS_setfsgid, old_gid);
  syscall(SYS_capset, &h, caps);
  errno = err;
  return fd;
}
