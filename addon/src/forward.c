// The front door's forwarding thread (forward.h).
//
// Plain read/write through a buffer per direction, not splice(2): what the
// front door must make fast is a small request and its reply (connect() to
// first byte), where splice costs the same two calls per chunk plus two
// pipes (four descriptors, and pipe2 on every connection) and saves a copy
// only for bulk transfers.
//
// Edge-triggered epoll: each direction is pumped until its source says
// EAGAIN (an EPOLLIN edge will come) or its destination does (EPOLLOUT is
// then asked for on it, once: asking for it from the start would wake the
// thread at once for every new connection, a hand-off on the critical
// path that costs tens of µs on a busy machine).
#define _GNU_SOURCE
#include "forward.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <linux/sockios.h>
#include <time.h>
#include <unistd.h>

#define FWD_BUF 16384
#define FWD_BATCH 64
// Reports per wake-up: two per connection event at most, and what the
// listeners' accepts add (they stop at this bound: level-triggered, they
// are taken up again at the next wake-up).
#define FWD_OUT (FWD_BATCH * 4)
// Reports that only keep Node's counts (a connection forwarded under a
// grant, one closed) wait this long for company, so that Node's thread
// wakes once per connection, not twice, and not between a client's
// connect and its reply, where it competes for the CPU with the client
// and the instance. Every other report (a connection handed over, a
// connect refused or done, an instance dead) goes at once, with those
// pending before it.
// Off by default: on a quiet machine (a core free for Node) waking Node at
// once costs less than the delay's timer ((b) - (a) 78 against 95 us,
// medians of 8 and 9 alternated runs, 2026-12-01); on a loaded one the delay
// won (57 against 75 us). APPSHOT_FWD_LAZY_MS=N turns it on (N ms).
#define FWD_LAZY_MS 0

struct fwd_half {
  uint32_t off, len;  // pending bytes: buf[off, off + len)
  uint8_t eof;        // the source said end-of-file
  uint8_t shut;       // ... and that end was passed on (SHUT_WR)
  uint64_t bytes;
  char buf[FWD_BUF];
};

enum fwd_state {
  // fwd_connect is registering it (holding loop->lock): the thread waits.
  FWD_SETUP,
  // The instance's connect is under way; only its socket's events count.
  FWD_CONNECTING,
  FWD_OPEN,
  // Its registration failed: descriptors gone, freed by the thread.
  FWD_DOOMED,
};

struct fwd_conn {
  uint32_t id;
  // The listener it was accepted on under a grant (0: fwd_connect's), so
  // that a serve that stops can end what its listeners forwarded before
  // their reports reached it (fwd_shut).
  uint32_t lid;
  uint8_t shut;  // fwd_shut shut it down already (under loop->lock)
  int state;  // enum fwd_state; __atomic, set by fwd_connect then the thread
  int fd[2];  // [0] the client (our duplicate), [1] the instance
  uint8_t out_armed[2];  // EPOLLOUT asked for on fd[i]
  int err;  // a failure fwd_connect's own pump met, for the thread to act on
  uint8_t dead;  // closed in this batch; freed after it
  // half[0] reads the client and writes the instance, half[1] the reverse.
  struct fwd_half half[2];
  struct fwd_conn *prev, *next;  // live list, for fwd_loop_stop
  struct fwd_conn *next_dead;
};

struct fwd_listener;

// The connections a group of listeners (a service's public ports) has
// handed to Node and Node still holds a descriptor of: at max_held the
// group's listeners stop accepting, so that what comes next waits in the
// kernel's listen backlog (which holds it as well: no reset) instead of
// taking descriptors until accept says EMFILE.
struct fwd_group {
  uint32_t id;
  uint32_t held, max_held;
  struct fwd_group *next;
};

// epoll data of the loop's own descriptors. Connections are tagged with
// their side (bit 0), listeners with 2 and their instance's pidfd with 3:
// heap pointers have those bits clear and are never this small.
#define FWD_TAG_KNOCK 0
#define FWD_TAG_BACKOFF 4
// Pauses of a listener after accept said out of descriptors or memory:
// doubled each time up to the last, back to the first after an accept.
#define FWD_BACKOFF_FIRST_MS 10
#define FWD_BACKOFF_LAST_MS 1000

struct fwd_loop {
  int epfd;
  int wakefd;  // eventfd: fwd_loop_stop's and fwd_connect's knock
  int stopping;  // set by fwd_loop_stop, read by the thread (__atomic)
  pthread_t thread;
  fwd_report_fn report;
  void *ctx;
  // Held by fwd_connect while it registers a connection, and by the thread
  // to close one: a connection is never closed half-registered.
  pthread_mutex_t lock;
  struct fwd_conn *live;
  struct fwd_conn *doomed;  // for the thread to free (under lock)
  struct fwd_listener *listeners;  // kept until fwd_loop_stop (under lock)
  struct fwd_group *groups;  // likewise
  uint32_t next_id;  // of connections the thread accepts (thread only)
  // Listeners paused after EMFILE and the like wait for this timer
  // (thread only, but for the descriptor).
  int backoff_fd;
  int backoff_armed;
  int backoff_ms;
  // FWD_LAZY_MS, in ns (read once, on the thread that starts the loop).
  uint64_t lazy_ns;
  // Connections the thread freed, kept for its next accepts (thread
  // only; FWD_SPARE at most).
  struct fwd_conn *spare;
  int nspare;
};

// A connection is ~33 KiB (its two buffers): taken from malloc at each
// accept, it takes the lock of an arena that serve's threads share with
// Node's (one arena: commands/serve.ts), on the way from the client's
// connect() to its first byte. The thread keeps a few it freed instead.
#define FWD_SPARE 8

// On the thread: a connection, zeroed but for its buffers.
static struct fwd_conn *conn_take(struct fwd_loop *loop) {
  struct fwd_conn *c = loop->spare;
  if (!c) return calloc(1, sizeof *c);
  loop->spare = c->next_dead;
  loop->nspare--;
  memset(c, 0, offsetof(struct fwd_conn, half));
  for (int i = 0; i < 2; i++) memset(&c->half[i], 0, offsetof(struct fwd_half, buf));
  c->prev = c->next = c->next_dead = NULL;
  return c;
}

// On the thread: a connection done with, kept or freed.
static void conn_give(struct fwd_loop *loop, struct fwd_conn *c) {
  if (loop->nspare >= FWD_SPARE) {
    free(c);
    return;
  }
  c->next_dead = loop->spare;
  loop->spare = c;
  loop->nspare++;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int set_nodelay(int fd) {
  int one = 1;
  return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int watch(struct fwd_loop *loop, struct fwd_conn *c, int i, int op) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLET | (c->out_armed[i] ? EPOLLOUT : 0)};
  ev.data.u64 = (uintptr_t)c | (uint64_t)i;
  return epoll_ctl(loop->epfd, op, c->fd[i], &ev);
}

// Both descriptors closed. The client's socket may still be open in Node
// (its own descriptor, until it hears it was connected), so its epoll
// registration does not go with our close: it is removed by hand, or the
// kernel would keep reporting it with a pointer to freed memory.
static void release_fds(struct fwd_loop *loop, struct fwd_conn *c) {
  for (int i = 0; i < 2; i++) {
    if (c->fd[i] < 0) continue;
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, c->fd[i], NULL);
    close(c->fd[i]);
    c->fd[i] = -1;
  }
}

// Moves bytes of one direction until a side would block. 0, or -errno of
// a failure that ends the connection.
static int pump(struct fwd_loop *loop, struct fwd_conn *c, int d) {
  struct fwd_half *h = &c->half[d];
  int src = c->fd[d], dst = c->fd[1 - d];
  for (;;) {
    if (h->len) {
      ssize_t m = send(dst, h->buf + h->off, h->len, MSG_NOSIGNAL);
      if (m < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) return -errno;
        // Full: the EPOLLOUT edge says when there is room (MOD looks at the
        // readiness now, so none is missed).
        if (!c->out_armed[1 - d]) {
          c->out_armed[1 - d] = 1;
          if (watch(loop, c, 1 - d, EPOLL_CTL_MOD) < 0) return -errno;
        }
        return 0;
      }
      h->off += (uint32_t)m;
      h->len -= (uint32_t)m;
      h->bytes += (uint64_t)m;
      continue;
    }
    if (h->eof) {
      // Half-close passed on, as the Node proxy did (allowHalfOpen): a
      // client that shuts its writing side still gets its reply.
      if (!h->shut) shutdown(dst, SHUT_WR);
      h->shut = 1;
      return 0;
    }
    ssize_t n = recv(src, h->buf, FWD_BUF, 0);
    if (n > 0) {
      h->off = 0;
      h->len = (uint32_t)n;
    } else if (n == 0) {
      h->eof = 1;
    } else if (errno == EINTR) {
      continue;
    } else {
      return errno == EAGAIN ? 0 : -errno;
    }
  }
}

// Connects a new socket to the instance (c->fd[1]) and registers both of
// c's sockets. 1: connected, and what the client had sent is on its way;
// 0: connecting (only if may_wait; the thread finishes it). -errno: nothing
// registered, fd[1] closed, fd[0] still the caller's, c too; unless
// *consumed: the registration failed half-way and the thread frees c
// (both descriptors closed).
static int start(struct fwd_loop *loop, struct fwd_conn *c, uint16_t port, int may_wait, int *consumed) {
  *consumed = 0;
  c->state = FWD_SETUP;
  c->fd[1] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int err = 0;
  if (c->fd[1] < 0) return -errno;
  // No Nagle delay on either side: a reply written in two pieces would
  // otherwise wait for an ACK.
  set_nodelay(c->fd[0]);
  set_nodelay(c->fd[1]);
  struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (connect(c->fd[1], (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
    err = errno;
    goto fail;
  }
  // Over loopback the handshake has run by the time connect returns (the
  // reply is processed as our socket is released), though it says
  // EINPROGRESS. If so the outcome is known here, and the client's request,
  // usually there already, goes to the instance now: one thread hand-off
  // less before the instance sees it.
  int done = 0;
  struct pollfd pfd = {.fd = c->fd[1], .events = POLLOUT};
  if (poll(&pfd, 1, 0) == 1) {
    socklen_t len = sizeof err;
    if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (!err && (pfd.revents & (POLLERR | POLLHUP))) err = ECONNREFUSED;
    if (err) goto fail;
    done = 1;
  } else if (!may_wait) {
    err = EINPROGRESS;
    goto fail;
  }
  c->out_armed[1] = !done;  // the connect's completion is an EPOLLOUT
  pthread_mutex_lock(&loop->lock);
  if (watch(loop, c, 0, EPOLL_CTL_ADD) < 0 || watch(loop, c, 1, EPOLL_CTL_ADD) < 0) {
    // The thread may hold an event of it already (it waits for the lock):
    // it frees it, once it can no longer be named.
    err = errno;
    release_fds(loop, c);
    __atomic_store_n(&c->state, FWD_DOOMED, __ATOMIC_RELEASE);
    c->next_dead = loop->doomed;
    loop->doomed = c;
    pthread_mutex_unlock(&loop->lock);
    uint64_t one = 1;
    if (write(loop->wakefd, &one, sizeof one) < 0) {
      // Freed at the thread's next wake-up instead.
    }
    *consumed = 1;
    return -err;
  }
  c->next = loop->live;
  if (loop->live) loop->live->prev = c;
  loop->live = c;
  if (done) {
    // Registered first, so that what arrives from now on raises an edge
    // the thread handles once we let go of the lock.
    c->err = -pump(loop, c, 0);
    // A failure there is the thread's to report (as a close): shutting
    // both sockets raises the events that make it look.
    if (c->err) {
      shutdown(c->fd[0], SHUT_RDWR);
      shutdown(c->fd[1], SHUT_RDWR);
    }
  }
  __atomic_store_n(&c->state, done ? FWD_OPEN : FWD_CONNECTING, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&loop->lock);
  return done;
fail:
  close(c->fd[1]);
  c->fd[1] = -1;
  return -err;
}

int fwd_connect(struct fwd_loop *loop, int client_fd, uint16_t port, uint32_t id) {
  struct fwd_conn *c = calloc(1, sizeof *c);
  if (!c) return -ENOMEM;
  c->id = id;
  c->fd[1] = -1;
  // The duplicate shares Node's file description, already non-blocking.
  c->fd[0] = fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
  if (c->fd[0] < 0) {
    int err = errno;
    free(c);
    return -err;
  }
  int consumed;
  int rc = start(loop, c, port, 1, &consumed);
  if (rc < 0 && !consumed) {
    close(c->fd[0]);
    free(c);
  }
  return rc;
}

// The listening sockets the thread accepts on itself (fwd_listen).
struct fwd_listener {
  int fd;
  uint32_t lid;
  struct fwd_group *group;
  // Not accepting (no EPOLLIN asked for) while its group holds max_held,
  // or after accept failed for want of descriptors or memory.
  uint8_t full, backoff;
  // Granted by Node (fwd_route): connections it may send to port without
  // asking, and how many it did in all (Node counts those it heard of).
  uint16_t port;
  uint32_t credit;
  uint32_t forwarded;
  // The granted instance's process, watched (pidfd in the epoll set) so
  // that its death revokes the grant here, at once, not when Node has
  // heard of it. pid_dead: it died; a grant naming it again is refused.
  int32_t pid;
  int pidfd;
  uint8_t pid_dead;
  struct fwd_listener *next;
};

// Asks for the listener's readiness, or stops asking (paused). Under lock.
static void arm_listener(struct fwd_loop *loop, struct fwd_listener *l) {
  if (l->fd < 0) return;
  struct epoll_event ev = {.events = l->full || l->backoff ? 0 : EPOLLIN};
  ev.data.u64 = (uintptr_t)l | 2;
  epoll_ctl(loop->epfd, EPOLL_CTL_MOD, l->fd, &ev);
}

// Under lock: the group has room again (or has none): its listeners
// resume (or pause) accepting. A resumed listener whose backlog is not
// empty is reported at once (level-triggered).
static void group_changed(struct fwd_loop *loop, struct fwd_group *g) {
  uint8_t full = g->held >= g->max_held;
  for (struct fwd_listener *l = loop->listeners; l; l = l->next) {
    if (l->group != g || l->full == full) continue;
    l->full = full;
    arm_listener(loop, l);
  }
}

static int pidfd_open_(int32_t pid) {
  return (int)syscall(SYS_pidfd_open, pid, 0);
}

// Whether the process a pidfd names has ended.
static int pidfd_ended(int pidfd) {
  struct pollfd pfd = {.fd = pidfd, .events = POLLIN};
  return poll(&pfd, 1, 0) == 1;
}

// Under lock: the listener no longer watches a process.
static void unwatch(struct fwd_loop *loop, struct fwd_listener *l) {
  if (l->pidfd >= 0) {
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, l->pidfd, NULL);
    close(l->pidfd);
  }
  l->pidfd = -1;
  l->pid = 0;
  l->pid_dead = 0;
}

// Under lock: the granted instance's process has ended. The grant goes
// (connections from now on are handed to Node, which holds them until
// it has restored the instance), and a grant naming it again is refused.
static void instance_died(struct fwd_loop *loop, struct fwd_listener *l) {
  if (l->pidfd >= 0) epoll_ctl(loop->epfd, EPOLL_CTL_DEL, l->pidfd, NULL);
  l->pid_dead = 1;
  l->port = 0;
  l->credit = 0;
}

// Accept failed for want of descriptors or memory. The listener is
// level-triggered and would be reported again at once: it is paused and
// the timer brings it back, the pause doubling while it keeps failing.
// Connections meanwhile wait in the backlog; forwarding goes on.
static void back_off(struct fwd_loop *loop, struct fwd_listener *l) {
  pthread_mutex_lock(&loop->lock);
  l->backoff = 1;
  arm_listener(loop, l);
  pthread_mutex_unlock(&loop->lock);
  if (loop->backoff_armed) return;
  int ms = loop->backoff_ms;
  struct itimerspec when = {.it_value = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L}};
  if (timerfd_settime(loop->backoff_fd, 0, &when, NULL) == 0) loop->backoff_armed = 1;
  loop->backoff_ms = ms * 2 > FWD_BACKOFF_LAST_MS ? FWD_BACKOFF_LAST_MS : ms * 2;
}

// The timer: every paused listener tries again.
static void backoff_over(struct fwd_loop *loop) {
  uint64_t count;
  if (read(loop->backoff_fd, &count, sizeof count) < 0) {
    // Not expired after all (re-armed): nothing to do.
  }
  loop->backoff_armed = 0;
  pthread_mutex_lock(&loop->lock);
  for (struct fwd_listener *l = loop->listeners; l; l = l->next) {
    if (!l->backoff) continue;
    l->backoff = 0;
    arm_listener(loop, l);
  }
  pthread_mutex_unlock(&loop->lock);
}

// Accepts what is waiting on l. Each connection goes at once to the
// instance Node named while Node's grant lasts (FWD_FORWARDED), else to
// Node itself (FWD_ACCEPTED, with the descriptor), which holds it and
// decides; at the group's max_held the listener stops accepting (it
// resumes when Node lets go of one, fwd_unhold). Called on the thread.
static int accept_all(struct fwd_loop *loop, struct fwd_listener *l, struct fwd_event *out, int room, uint32_t *next_id) {
  int n = 0;
  // (two reports at most per turn: an instance's death, then the accept)
  while (n < room - 1) {
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    // Under the lock: fwd_unlisten closes l->fd under it too, so this never
    // accepts on a descriptor number that has been closed and reused.
    pthread_mutex_lock(&loop->lock);
    if (l->fd < 0 || l->full || l->backoff) {
      pthread_mutex_unlock(&loop->lock);
      break;
    }
    if (l->group->held >= l->group->max_held) {
      // (Node may have lowered max_held since.)
      group_changed(loop, l->group);
      pthread_mutex_unlock(&loop->lock);
      break;
    }
    int fd = accept4(l->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    int accept_err = errno;
    // A process that has ended gets nothing more, even if its pidfd's
    // event is still to come in this batch.
    struct fwd_event died = {.kind = FWD_DIED, .lid = l->lid, .pid = l->pid, .port = l->port};
    int has_died = fd >= 0 && l->credit && l->pidfd >= 0 && !l->pid_dead && pidfd_ended(l->pidfd);
    if (has_died) instance_died(loop, l);
    uint16_t port = fd >= 0 && l->credit ? l->port : 0;
    if (port) l->credit--, l->forwarded++;
    pthread_mutex_unlock(&loop->lock);
    if (fd < 0) {
      if (accept_err == EINTR || accept_err == ECONNABORTED) continue;
      if (accept_err == EMFILE || accept_err == ENFILE || accept_err == ENOBUFS || accept_err == ENOMEM) back_off(loop, l);
      break;  // EAGAIN: all taken
    }
    loop->backoff_ms = FWD_BACKOFF_FIRST_MS;
    if (has_died) {
      died.at_ns = now_ns();
      out[n++] = died;
    }
    struct fwd_event ev = {.id = (*next_id)++ | 0x80000000u, .lid = l->lid, .at_ns = now_ns(),
                           .peer_ip = ntohl(peer.sin_addr.s_addr), .peer_port = ntohs(peer.sin_port)};
    struct fwd_conn *c = port ? conn_take(loop) : NULL;
    int rc = -1, consumed = 0;
    if (c) {
      c->id = ev.id;
      c->lid = l->lid;
      c->fd[0] = fd;
      // Only a connect done on the spot counts: one still under way is
      // Node's to decide about (it would be refused or retried there).
      rc = start(loop, c, port, 0, &consumed);
    }
    if (rc == 1) {
      ev.kind = FWD_FORWARDED;
      ev.port = port;
    } else {
      pthread_mutex_lock(&loop->lock);
      if (port) {
        // Granted but not forwarded: the grant is given back.
        l->forwarded--;
        l->credit++;
      }
      // Node holds it from now on (until fwd_unhold).
      if (!consumed) l->group->held++;
      pthread_mutex_unlock(&loop->lock);
      if (consumed) continue;  // registration failed: the client is closed
      if (c) conn_give(loop, c);
      ev.kind = FWD_ACCEPTED;
      ev.fd = fd;
    }
    out[n++] = ev;
  }
  return n;
}

// Both ways ended cleanly: the instance has closed its side and everything
// we sent it has been acknowledged (nothing left in our send queue), so an
// abortive close loses nothing; it spares the instance's socket the
// TIME_WAIT that an orderly one leaves when the client closed first. Each
// forwarded connection would otherwise hold a second loopback port for a
// minute: at a few hundred connections a second the local port range is
// full of them, and every connect() (the front door's and everyone else's)
// slows down searching it.
static void no_time_wait(int fd) {
  int queued = 0;
  if (ioctl(fd, SIOCOUTQ, &queued) < 0 || queued != 0) return;
  struct linger abort_on_close = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof abort_on_close);
}

// Closes a connection (its events later in this batch are skipped; it is
// freed after the batch).
static void finish(struct fwd_loop *loop, struct fwd_conn *c, struct fwd_conn **dead) {
  pthread_mutex_lock(&loop->lock);
  release_fds(loop, c);
  if (c->prev) c->prev->next = c->next;
  else loop->live = c->next;
  if (c->next) c->next->prev = c->prev;
  pthread_mutex_unlock(&loop->lock);
  c->dead = 1;
  c->next_dead = *dead;
  *dead = c;
}

// Whether a report must reach Node at once (see FWD_LAZY_MS).
static int urgent(const struct fwd_event *e) {
  return e->kind != FWD_FORWARDED && e->kind != FWD_CLOSED;
}

static void *fwd_thread(void *arg) {
  struct fwd_loop *loop = arg;
  // (ps -L, /proc/PID/task/*/comm: which thread is the front door's)
  pthread_setname_np(pthread_self(), "appshot-fwd");
  struct epoll_event evs[FWD_BATCH];
  struct fwd_event out[FWD_OUT];
  // Reports not yet sent (lazy ones: FWD_LAZY_MS), the first since when.
  int nout = 0;
  uint64_t pending_since = 0;
  const uint64_t lazy = loop->lazy_ns;
  while (!__atomic_load_n(&loop->stopping, __ATOMIC_ACQUIRE)) {
    int timeout = -1;
    if (nout) {
      uint64_t waited = now_ns() - pending_since;
      timeout = waited >= lazy ? 0 : (int)((lazy - waited + 999999u) / 1000000u);
    }
    int n = epoll_wait(loop->epfd, evs, FWD_BATCH, timeout);
    if (n < 0) n = 0;  // EINTR: the pending reports are still looked at
    int from = nout;
    struct fwd_conn *dead = NULL;
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u64 == 0) {  // a knock: stop (the loop's test) or doomed
        uint64_t count;
        if (read(loop->wakefd, &count, sizeof count) < 0) {
          // Nothing to read: an earlier wake-up took it.
        }
        continue;
      }
      if (evs[i].data.u64 == FWD_TAG_BACKOFF) {
        backoff_over(loop);
        continue;
      }
      if ((evs[i].data.u64 & 3) == 3) {  // a granted instance's process ended
        struct fwd_listener *l = (struct fwd_listener *)(uintptr_t)(evs[i].data.u64 & ~(uint64_t)3);
        pthread_mutex_lock(&loop->lock);
        // Asked again: fwd_route may have replaced the pidfd (a new
        // instance) since epoll_wait returned this event of the old one.
        int32_t pid = !l->pid_dead && l->pidfd >= 0 && pidfd_ended(l->pidfd) ? l->pid : 0;
        uint16_t port = l->port;
        int room = nout < FWD_OUT - 2;
        if (pid && room) {
          instance_died(loop, l);
        } else if (pid) {
          // No room to say so in this batch: the grant goes now, and the
          // pidfd stays in the set (level-triggered) to be told next time.
          l->port = 0;
          l->credit = 0;
        }
        pthread_mutex_unlock(&loop->lock);
        if (pid && room) out[nout++] = (struct fwd_event){.kind = FWD_DIED, .lid = l->lid, .pid = pid, .port = port, .at_ns = now_ns()};
        continue;
      }
      if (evs[i].data.u64 & 2) {
        struct fwd_listener *l = (struct fwd_listener *)(uintptr_t)(evs[i].data.u64 & ~(uint64_t)3);
        nout += accept_all(loop, l, out + nout, FWD_OUT - nout, &loop->next_id);
        continue;
      }
      struct fwd_conn *c = (struct fwd_conn *)(uintptr_t)(evs[i].data.u64 & ~(uint64_t)1);
      int side = (int)(evs[i].data.u64 & 1);
      uint32_t e = evs[i].events;
      int st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
      if (st == FWD_SETUP) {
        // fwd_connect still holds it; once it lets go the state is final.
        pthread_mutex_lock(&loop->lock);
        pthread_mutex_unlock(&loop->lock);
        st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
      }
      if (st == FWD_DOOMED || c->dead) continue;
      if (nout > FWD_OUT - 2) {
        // No room to report: re-raise this one's readiness for the next
        // wake-up (MOD looks at it again) instead of losing the edge.
        watch(loop, c, side, EPOLL_CTL_MOD);
        continue;
      }
      int err = 0;
      if (st == FWD_CONNECTING) {
        if (side == 0) continue;  // pumped when connected
        socklen_t len = sizeof err;
        if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (!err && (e & (EPOLLERR | EPOLLHUP))) err = ECONNREFUSED;
        if (!err && !(e & EPOLLOUT)) continue;  // still connecting
        if (err) {
          // The client's socket goes back to Node untouched.
          out[nout++] = (struct fwd_event){.id = c->id, .kind = FWD_REFUSED, .err = err, .at_ns = now_ns()};
          finish(loop, c, &dead);
          continue;
        }
        __atomic_store_n(&c->state, FWD_OPEN, __ATOMIC_RELAXED);
        out[nout++] = (struct fwd_event){.id = c->id, .kind = FWD_CONNECTED, .at_ns = now_ns()};
        // What the client sent while we connected (its request, usually)
        // raised an edge we ignored: pump both ways now.
        if ((err = -pump(loop, c, 0)) == 0) err = -pump(loop, c, 1);
      } else if (c->err) {
        err = c->err;
      } else if (e & (EPOLLERR | EPOLLHUP)) {
        if ((err = -pump(loop, c, 0)) == 0) err = -pump(loop, c, 1);
      } else {
        // Readable: its direction moves; writable: the other one, which
        // writes to it, was waiting for room.
        if (e & EPOLLIN) err = -pump(loop, c, side);
        if (!err && (e & EPOLLOUT)) err = -pump(loop, c, 1 - side);
      }
      if (!err && !(c->half[0].shut && c->half[1].shut)) continue;
      if (err) {
        // Node's own descriptor of the client may still be open: shutdown,
        // not just close, so that the client hears the end now.
        shutdown(c->fd[0], SHUT_RDWR);
      } else {
        no_time_wait(c->fd[1]);
      }
      out[nout++] = (struct fwd_event){
          .id = c->id, .kind = FWD_CLOSED, .err = err, .to_instance = c->half[0].bytes, .to_client = c->half[1].bytes, .at_ns = now_ns()};
      finish(loop, c, &dead);
    }
    int now_due = 0;
    for (int i = from; i < nout && !now_due; i++) now_due = urgent(&out[i]);
    if (nout && !from) pending_since = now_ns();
    if (nout && (now_due || nout > FWD_OUT / 2 || now_ns() - pending_since >= lazy)) {
      loop->report(loop->ctx, out, nout);
      nout = 0;
    }
    // Freed only now: a later event of this batch may name a connection
    // an earlier one closed, or one whose registration failed.
    pthread_mutex_lock(&loop->lock);
    struct fwd_conn *doomed = loop->doomed;
    loop->doomed = NULL;
    pthread_mutex_unlock(&loop->lock);
    while (doomed) {
      struct fwd_conn *next = doomed->next_dead;
      conn_give(loop, doomed);
      doomed = next;
    }
    while (dead) {
      struct fwd_conn *next = dead->next_dead;
      conn_give(loop, dead);
      dead = next;
    }
  }
  return NULL;
}

struct fwd_loop *fwd_loop_start(fwd_report_fn report, void *ctx, int *err) {
  struct fwd_loop *loop = calloc(1, sizeof *loop);
  if (!loop) {
    *err = ENOMEM;
    return NULL;
  }
  loop->report = report;
  loop->ctx = ctx;
  loop->epfd = epoll_create1(EPOLL_CLOEXEC);
  loop->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  loop->backoff_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  loop->backoff_ms = FWD_BACKOFF_FIRST_MS;
  const char *lazy_ms = getenv("APPSHOT_FWD_LAZY_MS");
  int lazy = lazy_ms ? atoi(lazy_ms) : FWD_LAZY_MS;
  loop->lazy_ns = (uint64_t)(lazy > 0 ? lazy : 0) * 1000000u;
  pthread_mutex_init(&loop->lock, NULL);
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = FWD_TAG_KNOCK};
  struct epoll_event timer_ev = {.events = EPOLLIN, .data.u64 = FWD_TAG_BACKOFF};
  if (loop->epfd < 0 || loop->wakefd < 0 || loop->backoff_fd < 0 || epoll_ctl(loop->epfd, EPOLL_CTL_ADD, loop->wakefd, &ev) < 0 ||
      epoll_ctl(loop->epfd, EPOLL_CTL_ADD, loop->backoff_fd, &timer_ev) < 0 ||
      (errno = pthread_create(&loop->thread, NULL, fwd_thread, loop)) != 0) {
    *err = errno;
    if (loop->epfd >= 0) close(loop->epfd);
    if (loop->wakefd >= 0) close(loop->wakefd);
    if (loop->backoff_fd >= 0) close(loop->backoff_fd);
    pthread_mutex_destroy(&loop->lock);
    free(loop);
    return NULL;
  }
  return loop;
}

// Under lock.
static struct fwd_group *find_group(struct fwd_loop *loop, uint32_t id) {
  for (struct fwd_group *g = loop->groups; g; g = g->next)
    if (g->id == id) return g;
  return NULL;
}

int fwd_listen(struct fwd_loop *loop, int listen_fd, uint32_t lid, uint32_t group, uint32_t max_held) {
  struct fwd_listener *l = calloc(1, sizeof *l);
  if (!l) return -ENOMEM;
  l->lid = lid;
  l->pidfd = -1;
  l->fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 0);
  int err = 0;
  if (l->fd < 0) {
    err = errno;
    free(l);
    return -err;
  }
  pthread_mutex_lock(&loop->lock);
  struct fwd_group *g = find_group(loop, group);
  if (!g && (g = calloc(1, sizeof *g))) {
    g->id = group;
    g->next = loop->groups;
    loop->groups = g;
  }
  if (!g) {
    pthread_mutex_unlock(&loop->lock);
    close(l->fd);
    free(l);
    return -ENOMEM;
  }
  g->max_held = max_held ? max_held : 1;
  l->group = g;
  l->full = g->held >= g->max_held;
  // Level-triggered: an accept loop cut short (no room to report) resumes.
  struct epoll_event ev = {.events = l->full ? 0 : EPOLLIN};
  ev.data.u64 = (uintptr_t)l | 2;
  l->next = loop->listeners;
  loop->listeners = l;
  if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, l->fd, &ev) < 0) {
    err = errno;
    close(l->fd);
    l->fd = -1;  // stays listed (and freed at stop): harmless
  }
  group_changed(loop, g);
  pthread_mutex_unlock(&loop->lock);
  return -err;
}

static struct fwd_listener *find_listener(struct fwd_loop *loop, uint32_t lid) {
  for (struct fwd_listener *l = loop->listeners; l; l = l->next)
    if (l->lid == lid) return l;
  return NULL;
}

int64_t fwd_route(struct fwd_loop *loop, uint32_t lid, uint16_t port, uint32_t capacity, uint32_t seen, int32_t pid) {
  pthread_mutex_lock(&loop->lock);
  struct fwd_listener *l = find_listener(loop, lid);
  int64_t inflight = -ENOENT;
  if (l) {
    inflight = (uint32_t)(l->forwarded - seen);
    if (!port || pid <= 0) {
      unwatch(loop, l);
    } else if (pid != l->pid || l->pid_dead) {
      // A new instance (or the number of a dead one again: a new process
      // now, or the dead one still unreaped, which pidfd_ended tells).
      unwatch(loop, l);
      int pidfd = pidfd_open_(pid);
      if (pidfd < 0 && errno == ESRCH) {
        port = 0;  // gone already
      } else if (pidfd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = (uintptr_t)l | 3;
        l->pid = pid;
        l->pidfd = pidfd;
        if (pidfd_ended(pidfd)) {
          l->pid_dead = 1;
          port = 0;
        } else if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, pidfd, &ev) < 0) {
          unwatch(loop, l);  // granted unwatched: as before pidfds
        }
      }
      // (Another failure, no pidfd_open: granted unwatched.)
    }
    l->port = port;
    l->credit = port && capacity > inflight ? capacity - (uint32_t)inflight : 0;
  }
  pthread_mutex_unlock(&loop->lock);
  return inflight;
}

void fwd_unhold(struct fwd_loop *loop, uint32_t lid, uint32_t n) {
  pthread_mutex_lock(&loop->lock);
  struct fwd_listener *l = find_listener(loop, lid);
  if (l) {
    l->group->held = l->group->held > n ? l->group->held - n : 0;
    group_changed(loop, l->group);
  }
  pthread_mutex_unlock(&loop->lock);
}

void fwd_unlisten(struct fwd_loop *loop, uint32_t lid) {
  pthread_mutex_lock(&loop->lock);
  struct fwd_listener *l = find_listener(loop, lid);
  if (l && l->fd >= 0) {
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, l->fd, NULL);
    close(l->fd);
    l->fd = -1;
    l->credit = 0;
    unwatch(loop, l);
  }
  pthread_mutex_unlock(&loop->lock);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static int has_u32(const uint32_t *sorted, size_t n, uint32_t v) {
  return n && bsearch(&v, sorted, n, sizeof v, cmp_u32) != NULL;
}

int fwd_shut(struct fwd_loop *loop, uint32_t *ids, size_t nids, uint32_t *lids, size_t nlids, int shut) {
  // Sorted once, looked up per connection: n log n for a serve that ends
  // thousands at once, on Node's thread and under the lock.
  if (nids > 1) qsort(ids, nids, sizeof *ids, cmp_u32);
  if (nlids > 1) qsort(lids, nlids, sizeof *lids, cmp_u32);
  int n = 0;
  pthread_mutex_lock(&loop->lock);
  // Under the lock the live list is whole and its descriptors open
  // (finish takes it to unlink and close them).
  for (struct fwd_conn *c = loop->live; c; c = c->next) {
    if (!has_u32(ids, nids, c->id) && !(c->lid && has_u32(lids, nlids, c->lid))) continue;
    n++;
    if (!shut || c->shut) continue;
    c->shut = 1;
    // shutdown raises HUP on both for the thread's epoll (edge-triggered
    // too: it is a state change), which pumps each side to its end. The
    // close that follows is abortive (a reset): a client that never
    // closes its end would otherwise keep our side in FIN-WAIT-2 on the
    // public port for a minute after serve has gone.
    struct linger abort_on_close = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < 2; i++) {
      if (c->fd[i] < 0) continue;
      setsockopt(c->fd[i], SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof abort_on_close);
      shutdown(c->fd[i], SHUT_RDWR);
    }
  }
  pthread_mutex_unlock(&loop->lock);
  return n;
}

void fwd_loop_stop(struct fwd_loop *loop) {
  __atomic_store_n(&loop->stopping, 1, __ATOMIC_RELEASE);
  uint64_t one = 1;
  while (write(loop->wakefd, &one, sizeof one) < 0 && errno == EINTR) {
  }
  pthread_join(loop->thread, NULL);
  for (struct fwd_conn *c = loop->live, *next; c; c = next) {
    next = c->next;
    release_fds(loop, c);
    free(c);
  }
  for (struct fwd_conn *c = loop->doomed, *next; c; c = next) {
    next = c->next_dead;
    free(c);
  }
  for (struct fwd_conn *c = loop->spare, *next; c; c = next) {
    next = c->next_dead;
    free(c);
  }
  for (struct fwd_listener *l = loop->listeners, *next; l; l = next) {
    next = l->next;
    if (l->fd >= 0) close(l->fd);
    if (l->pidfd >= 0) close(l->pidfd);
    free(l);
  }
  for (struct fwd_group *g = loop->groups, *next; g; g = next) {
    next = g->next;
    free(g);
  }
  close(loop->backoff_fd);
  close(loop->wakefd);
  close(loop->epfd);
  pthread_mutex_destroy(&loop->lock);
  free(loop);
}
