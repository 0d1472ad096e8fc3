/*
 * appshot-keeper: holds an ended application's TCP connections between
 * its snapshot and its restore.
 *
 * A default snapshot ends the application. Its connections were put in
 * repair mode with a filter that drops every packet (src/resources/tcp.ts),
 * but once the last descriptor of such a socket is closed, the socket is
 * gone, and the kernel answers whatever the peer sends next (a
 * retransmission of what the filter dropped, or new data) with a reset.
 * This process holds a descriptor of each of those sockets instead: still
 * in repair mode and still dropping everything, they neither send nor
 * accept a byte, and the peer, hearing nothing, retransmits with backoff.
 * The restore of the same image takes the very sockets back (the queues
 * are the ones the image recorded, nothing having moved since), so the
 * connection never stops existing on this host.
 *
 * Usage (by appshot only): appshot-keeper PATH IMAGE_ID HOLD_SECONDS, with
 * descriptor 3 a unix socket on which appshot sends, with SCM_RIGHTS, the
 * listening socket bound at PATH and then every connection, then shuts its
 * side; the keeper answers "HELD <count>\n" (appshot ends the application
 * only once every descriptor is held).
 *
 * A connection to PATH from a process of the same user (or root), with
 * one line:
 *   "TAKE <image id>\n"  the sockets are sent back if the id is the image's
 *                        they came from, and kept here too until the
 *                        restore answers "DONE\n" (it committed): a restore
 *                        that fails or is killed before leaves them held
 *                        for the next. Otherwise (an older or a newer
 *                        image of the same application is being restored,
 *                        which would clash with them) they are dropped and
 *                        "DROP\n" is answered.
 * Either way the keeper then leaves. It also leaves, dropping them, after
 * HOLD_SECONDS, or once PATH is no longer its socket (the state directory
 * removed). Dropped in repair mode, a socket closes without a word to its
 * peer, which later gives up on its own or gets a reset when it sends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "appshot_fds.h"

#define CONTROL_FD 3
#define FDS_PER_MESSAGE APPSHOT_FDS_PER_MESSAGE

static int *held;
static size_t nheld, capacity;

static void hold(int fd) {
  if (nheld == capacity) {
    capacity = capacity ? capacity * 2 : 64;
    held = realloc(held, capacity * sizeof *held);
    if (!held) _exit(1);
  }
  held[nheld++] = fd;
}

/* Every descriptor appshot sends on the control socket, until it closes. */
static void receive_all(void) {
  for (;;) {
    char byte;
    char control[CMSG_SPACE(FDS_PER_MESSAGE * sizeof(int))];
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(CONTROL_FD, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    /* Descriptors cut off (no room for them here): what is held would
     * not be what appshot handed over, which the count below tells it. */
    if (msg.msg_flags & MSG_CTRUNC) _exit(1);
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      int fds[FDS_PER_MESSAGE];
      memcpy(fds, CMSG_DATA(c), count * sizeof(int));
      for (size_t i = 0; i < count; i++) hold(fds[i]);
    }
  }
}

/* The connections (all but the listener), to the restore on `to`. */
static int send_connections(int to) {
  if (appshot_send_fds(to, held + 1, nheld - 1)) return -1;
  /* The end of them: the connection stays open for "DONE". */
  static const char end = 'E';
  return write(to, &end, 1) == 1 ? 0 : -1;
}

/* The request line, or NULL: one line, sent at once by appshot. */
static const char *read_request(int c, char *buf, size_t size) {
  struct timeval tv = {5, 0};
  setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  size_t len = 0;
  while (len < size - 1) {
    ssize_t n = read(c, buf + len, size - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return NULL;
    len += (size_t)n;
    buf[len] = 0;
    char *nl = strchr(buf, '\n');
    if (nl) {
      *nl = 0;
      return buf;
    }
  }
  return NULL;
}

static int expired(const struct timespec *start, long hold_seconds) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec - start->tv_sec >= hold_seconds;
}

/* Waits for the restore that took the connections to say "DONE" (true),
 * or to go away without saying it (false: it failed or was killed, and
 * the connections are held again). Past the hold, or with the state
 * directory gone, the keeper leaves anyway (true): the restore holds its
 * own descriptors of them. */
static int still_ours(const char *path, const struct stat *bound);
static int restore_done(int c, const struct timespec *start, long hold_seconds, const char *path, const struct stat *bound) {
  char buf[16];
  size_t len = 0;
  for (;;) {
    struct pollfd p = {c, POLLIN, 0};
    int ready = poll(&p, 1, 1000);
    if (expired(start, hold_seconds) || !still_ours(path, bound)) return 1;
    if (ready <= 0) continue;
    ssize_t n = read(c, buf + len, sizeof buf - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return 0;
    len += (size_t)n;
    buf[len] = 0;
    if (strstr(buf, "DONE\n")) return 1;
    if (len == sizeof buf - 1) return 0;
  }
}

/* Whether PATH is still the socket this keeper listens on. */
static int still_ours(const char *path, const struct stat *bound) {
  struct stat now;
  return stat(path, &now) == 0 && now.st_ino == bound->st_ino && now.st_dev == bound->st_dev;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "appshot-keeper: run by appshot only\n");
    return 2;
  }
  const char *path = argv[1], *image_id = argv[2];
  long hold_seconds = atol(argv[3]);
  // Not appshot's child for long: reaped by init (or the nearest
  // subreaper), never left a zombie in a resident engine.
  pid_t child = fork();
  if (child < 0) return 1;
  if (child > 0) _exit(0);
  signal(SIGPIPE, SIG_IGN);
  /* Nothing of appshot's working directory kept busy for the hold. */
  if (chdir("/")) {
  }
  receive_all();
  /* appshot waits for this count before it ends the application: the
   * keeper holds what it was handed, or the snapshot fails. */
  char count[32];
  int len = snprintf(count, sizeof count, "HELD %zu\n", nheld);
  if (write(CONTROL_FD, count, (size_t)len) != len) return 1;
  close(CONTROL_FD);
  if (nheld < 2) return 1;
  int listener = held[0];
  struct stat bound;
  if (stat(path, &bound) != 0) return 1;
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    struct pollfd p = {listener, POLLIN, 0};
    int ready = poll(&p, 1, 1000);
    if (expired(&start, hold_seconds) || !still_ours(path, &bound)) break;
    if (ready <= 0) continue;
    int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) continue;
    struct ucred cred;
    socklen_t clen = sizeof cred;
    char buf[256];
    const char *request;
    // Only the user whose connections these are, or root, may take them.
    if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || (cred.uid != getuid() && cred.uid != 0) ||
        !(request = read_request(c, buf, sizeof buf)) || strncmp(request, "TAKE ", 5) != 0) {
      close(c);
      continue;
    }
    if (strcmp(request + 5, image_id) != 0) {
      static const char drop[] = "DROP\n";
      (void)!write(c, drop, sizeof drop - 1);
      close(c);
      break;
    }
    /* Our copies are kept until the restore says it is done (committed):
     * a restore that fails, or is killed, leaves them here for the next
     * one. */
    if (send_connections(c) == 0 && restore_done(c, &start, hold_seconds, path, &bound)) {
      close(c);
      break;
    }
    close(c);
  }
  if (still_ours(path, &bound)) unlink(path);
  return 0;
}

